//! The pieces of a SentencePiece `tokenizer.model` (Llama 2, Mistral, Gemma, Phi-3), which is
//! a serialised `ModelProto` (sentencepiece's `sentencepiece_model.proto`). Only what llama.cpp's
//! converter reads is decoded: each piece's text, score and type, in id order. Everything
//! else (trainer and normalizer specs) is skipped by its wire type.
//!
//! The file is an untrusted download: its size is checked before it is read, every length is
//! checked against what is left, and the pieces must be UTF-8.

use std::path::Path;

use crate::error::{Error, Result};

/// Gemma 3's tokenizer.model is 4.7 MB; anything past this is not a tokenizer.
const MAX_BYTES: u64 = 256 << 20;

/// `ModelProto.SentencePiece.Type`, with the same numbers (the GGUF token types reuse them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// One vocabulary entry: `ModelProto.SentencePiece`.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// The pieces of a tokenizer.model; a piece's id is its index.
#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
}

impl SentencePieceModel {
    pub fn open(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        if len > MAX_BYTES {
            return Err(Error::format(path, format!("{len} bytes; a SentencePiece model is at most {MAX_BYTES}")));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes).map_err(|msg| Error::Tokenizer { path: path.to_path_buf(), msg: format!("not a SentencePiece model: {msg}") })
    }

    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut pieces = Vec::new();
        let mut r = Reader { b: bytes, pos: 0 };
        while !r.done() {
            let (field, wire) = r.key()?;
            if field == 1 && wire == LEN {
                let body = r.bytes()?;
                pieces.push(piece(body).map_err(|e| format!("piece {}: {e}", pieces.len()))?);
            } else {
                r.skip(wire)?;
            }
        }
        if pieces.is_empty() {
            return Err("no pieces".into());
        }
        Ok(SentencePieceModel { pieces })
    }
}

const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;
const I32: u64 = 5;

/// `SentencePiece { optional string piece = 1; optional float score = 2; optional Type type = 3 [default = NORMAL]; }`
fn piece(body: &[u8]) -> std::result::Result<Piece, String> {
    let mut r = Reader { b: body, pos: 0 };
    let (mut text, mut score, mut kind) = (String::new(), 0f32, PieceType::Normal);
    while !r.done() {
        match r.key()? {
            (1, LEN) => text = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "the piece is not UTF-8".to_string())?,
            (2, I32) => score = f32::from_le_bytes(r.fixed::<4>()?),
            (3, VARINT) => {
                kind = match r.varint()? {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    t => return Err(format!("unknown piece type {t}")),
                }
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(Piece { piece: text, score, kind })
}

/// Protocol-buffer wire format, bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn key(&mut self) -> std::result::Result<(u64, u64), String> {
        let k = self.varint()?;
        Ok((k >> 3, k & 7))
    }

    fn take(&mut self, n: u64) -> std::result::Result<&'a [u8], String> {
        let left = (self.b.len() - self.pos) as u64;
        if n > left {
            return Err(format!("a field of {n} bytes at offset {} runs past the end ({left} left)", self.pos));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn bytes(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.varint()?;
        self.take(n)
    }

    fn fixed<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N as u64)?.try_into().expect("N bytes"))
    }

    fn skip(&mut self, wire: u64) -> std::result::Result<(), String> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            I32 => self.take(4).map(drop),
            w => Err(format!("wire type {w} at offset {} (groups are not used by SentencePiece)", self.pos)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn piece_bytes(text: &str, score: f32, kind: Option<u64>) -> Vec<u8> {
        let mut p = vec![0x0a];
        varint(text.len() as u64, &mut p);
        p.extend_from_slice(text.as_bytes());
        p.push(0x15);
        p.extend_from_slice(&score.to_le_bytes());
        if let Some(k) = kind {
            p.push(0x18);
            varint(k, &mut p);
        }
        p
    }

    fn model(pieces: &[Vec<u8>]) -> Vec<u8> {
        let mut m = Vec::new();
        for p in pieces {
            m.push(0x0a);
            varint(p.len() as u64, &mut m);
            m.extend_from_slice(p);
        }
        // a trainer_spec (field 2) with a varint inside, skipped
        m.extend_from_slice(&[0x12, 0x02, 0x08, 0x01]);
        m
    }

    #[test]
    fn reads_pieces_and_skips_the_rest() {
        let m = model(&[piece_bytes("<unk>", 0.0, Some(2)), piece_bytes("\u{2581}the", -3.5, None), piece_bytes("<0x41>", 0.0, Some(6))]);
        let spm = SentencePieceModel::parse(&m).unwrap();
        assert_eq!(spm.pieces.len(), 3);
        assert_eq!(spm.pieces[0], Piece { piece: "<unk>".into(), score: 0.0, kind: PieceType::Unknown });
        assert_eq!(spm.pieces[1], Piece { piece: "\u{2581}the".into(), score: -3.5, kind: PieceType::Normal });
        assert_eq!(spm.pieces[2].kind, PieceType::Byte);
    }

    #[test]
    fn truncated_and_hostile_input_is_an_error() {
        let m = model(&[piece_bytes("abc", 1.0, Some(1))]);
        for cut in 1..m.len() - 4 {
            assert!(SentencePieceModel::parse(&m[..cut]).is_err(), "cut at {cut}");
        }
        // a length far past the end
        let huge = [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(SentencePieceModel::parse(&huge).unwrap_err().contains("runs past the end"));
        assert!(SentencePieceModel::parse(&model(&[piece_bytes("x", 0.0, Some(9))])).unwrap_err().contains("unknown piece type 9"));
        assert!(SentencePieceModel::parse(&[]).is_err());
    }
}
