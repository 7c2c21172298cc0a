//! Data parallel across nodes (`train.nodes`): the link between the `tune run` processes of one
//! run, over TCP.
//!
//! Node 0 listens on `train.nodes.address`; the others connect to it. Each step every node sends
//! node 0 its block of the gradient rows (one row per replica, as [`super::parallel`] lays them
//! out), and node 0 sends every node all the blocks back in rank order. Each node then adds the
//! rows up itself, in replica order, so all of them, and one node with as many devices, compute
//! the same sum bit for bit.
//!
//! burn-collective's global level was the first choice, but in burn 0.21 its all-reduce runs
//! once per process: the barrier that ends each one (`SyncService::sync`) clears a copy of its
//! list of synced nodes instead of the list, so the second all-reduce waits forever. LoRA's
//! gradients are small, and a gather through node 0 is simple enough to own.
//!
//! Nothing in a frame is trusted: each has a length prefix that is checked against the size the
//! receiver expects before anything is allocated.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::recipe::Nodes;

/// How long node 0 waits for the others to join, and they for it to listen.
const JOIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Bumped whenever the frames change, so that two tune versions refuse each other clearly.
const PROTOCOL: u32 = 1;
/// A hello is a few kilobytes; anything far larger is not one.
const MAX_HELLO: u64 = 1 << 20;

/// What must be the same on every node for the nodes to train as one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// The recipe's keys that change what is trained (paths, which may differ between machines,
    /// and the keys a resume may change are left out), with their values.
    pub keys: BTreeMap<String, String>,
    /// The training data's fingerprint, and the eval set's.
    pub dataset: String,
    pub eval_dataset: Option<String>,
    /// The step the node starts at: 0, or the step of the checkpoint it resumes.
    pub first_step: usize,
}

/// The first frame a node sends node 0.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    protocol: u32,
    rank: u32,
    count: u32,
    /// Replicas on the node (train.devices).
    replicas: usize,
    /// Floats in a replica's row.
    width: usize,
    run: RunIdentity,
}

/// Node 0's answer once every node said hello: go, or why not.
type Welcome = std::result::Result<(), String>;

/// This node's connections: to every other node on node 0, to node 0 elsewhere.
pub struct NodeLink {
    rank: u32,
    /// Node 0: the streams of nodes 1, 2, …; the others: node 0's.
    streams: Vec<TcpStream>,
    /// Floats in one node's block of rows.
    block: usize,
    count: usize,
}

impl NodeLink {
    /// Joins the run: node 0 waits for every other node's hello and checks that they train the
    /// same run as it does; each other node connects to node 0 and waits for its answer.
    pub fn join(nodes: &Nodes, replicas: usize, width: usize, run: &RunIdentity) -> Result<NodeLink> {
        let hello = Hello { protocol: PROTOCOL, rank: nodes.rank, count: nodes.count, replicas, width, run: run.clone() };
        let block = replicas * width;
        let count = nodes.count as usize;
        if nodes.rank == 0 {
            let streams = gather_hellos(nodes, &hello)?;
            Ok(NodeLink { rank: 0, streams, block, count })
        } else {
            let mut stream = connect(nodes)?;
            write_frame(&mut stream, &serde_json::to_vec(&hello).expect("a hello serialises"))
                .map_err(|e| lost(nodes.rank, 0, "saying hello", e))?;
            let answer = read_frame(&mut stream, MAX_HELLO).map_err(|e| lost(nodes.rank, 0, "waiting for the others to join", e))?;
            let welcome: Welcome = serde_json::from_slice(&answer)
                .map_err(|e| Error::Unsupported(format!("train.nodes: node 0 answered with something that is not tune's: {e}")))?;
            welcome.map_err(|why| Error::Unsupported(format!("train.nodes: node 0 refused this node: {why}")))?;
            Ok(NodeLink { rank: nodes.rank, streams: vec![stream], block, count })
        }
    }

    /// Every node's block, in rank order, given this node's.
    pub fn all_gather(&mut self, block: &[f32]) -> Result<Vec<f32>> {
        assert_eq!(block.len(), self.block, "a node's block has replicas × width floats");
        let bytes = self.block as u64 * 4;
        if self.rank == 0 {
            let mut all = Vec::with_capacity(self.block * self.count);
            all.extend_from_slice(block);
            for (i, stream) in self.streams.iter_mut().enumerate() {
                let frame = read_frame(stream, bytes).map_err(|e| lost(0, i + 1, "gathering the gradients", e))?;
                if frame.len() as u64 != bytes {
                    return Err(Error::Unsupported(format!(
                        "train.nodes: node {} sent {} bytes of gradients, expected {bytes}",
                        i + 1,
                        frame.len()
                    )));
                }
                all.extend(floats(&frame));
            }
            let out = to_bytes(&all);
            for (i, stream) in self.streams.iter_mut().enumerate() {
                write_frame(stream, &out).map_err(|e| lost(0, i + 1, "sending the gradients back", e))?;
            }
            Ok(all)
        } else {
            let stream = &mut self.streams[0];
            write_frame(stream, &to_bytes(block)).map_err(|e| lost(self.rank, 0, "sending its gradients", e))?;
            let whole = bytes * self.count as u64;
            let frame = read_frame(stream, whole).map_err(|e| lost(self.rank, 0, "waiting for the gradients", e))?;
            if frame.len() as u64 != whole {
                return Err(Error::Unsupported(format!("train.nodes: node 0 sent {} bytes of gradients, expected {whole}", frame.len())));
            }
            Ok(floats(&frame).collect())
        }
    }
}

/// Node 0: accepts a connection and a hello from every other node, checks each against its
/// own, and answers all of them once all are in.
fn gather_hellos(nodes: &Nodes, own: &Hello) -> Result<Vec<TcpStream>> {
    let port = nodes.port().expect("the recipe checked train.nodes.address");
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| Error::Unsupported(format!("train.nodes: node 0 cannot listen on port {port}: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| Error::Unsupported(format!("train.nodes: {e}")))?;
    let others = nodes.count as usize - 1;
    let mut joined: Vec<Option<TcpStream>> = (0..others).map(|_| None).collect();
    let deadline = Instant::now() + JOIN_TIMEOUT;
    while joined.iter().any(Option::is_none) {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> =
                        joined.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| (i + 1).to_string()).collect();
                    return Err(Error::Unsupported(format!(
                        "train.nodes: waited {} s on port {port} and node(s) {} did not join",
                        JOIN_TIMEOUT.as_secs(),
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(Error::Unsupported(format!("train.nodes: node 0 cannot accept a connection: {e}"))),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        // A stray connection (a port scan, a wrong program) is dropped, not fatal.
        let Ok(frame) = read_frame(&mut stream, MAX_HELLO) else { continue };
        let Ok(hello) = serde_json::from_slice::<Hello>(&frame) else { continue };
        let rank = hello.rank as usize;
        if let Some(why) = mismatch(own, &hello) {
            let _ = write_frame(&mut stream, &serde_json::to_vec(&Welcome::Err(why)).expect("serialises"));
            // Its place stays open for the same node, started again with the right recipe.
            continue;
        }
        if joined[rank - 1].is_some() {
            let why = format!("node {rank} joined twice: each node needs its own train.nodes.rank");
            let _ = write_frame(&mut stream, &serde_json::to_vec(&Welcome::Err(why)).expect("serialises"));
            continue;
        }
        joined[rank - 1] = Some(stream);
    }
    let mut streams: Vec<TcpStream> = joined.into_iter().map(|s| s.expect("every node joined")).collect();
    let welcome = serde_json::to_vec(&Welcome::Ok(())).expect("serialises");
    for (i, stream) in streams.iter_mut().enumerate() {
        write_frame(stream, &welcome).map_err(|e| lost(0, i + 1, "welcoming it", e))?;
    }
    Ok(streams)
}

/// Why `theirs` cannot train with `own`, if it cannot.
fn mismatch(own: &Hello, theirs: &Hello) -> Option<String> {
    if theirs.protocol != own.protocol {
        return Some(format!("it speaks tune's node protocol {}, node 0 speaks {}", theirs.protocol, own.protocol));
    }
    if theirs.count != own.count {
        return Some(format!("train.nodes.count is {} there and {} on node 0", theirs.count, own.count));
    }
    if theirs.rank == 0 || theirs.rank >= own.count {
        return Some(format!("train.nodes.rank {} is not one of 1 to {}", theirs.rank, own.count - 1));
    }
    if theirs.replicas != own.replicas {
        return Some(format!("train.devices gives {} replicas there and {} on node 0", theirs.replicas, own.replicas));
    }
    if theirs.run.first_step != own.run.first_step {
        return Some(format!(
            "it starts at step {} and node 0 at step {}: resume every node from the same checkpoint",
            theirs.run.first_step, own.run.first_step
        ));
    }
    if theirs.run.dataset != own.run.dataset || theirs.run.eval_dataset != own.run.eval_dataset {
        return Some("its dataset differs from node 0's (the files' fingerprints differ)".into());
    }
    let keys: std::collections::BTreeSet<&String> = own.run.keys.keys().chain(theirs.run.keys.keys()).collect();
    let differ: Vec<&str> = keys.into_iter().filter(|k| own.run.keys.get(*k) != theirs.run.keys.get(*k)).map(String::as_str).collect();
    if !differ.is_empty() {
        return Some(format!("its recipe differs from node 0's in {}", differ.join(", ")));
    }
    if theirs.width != own.width {
        return Some(format!("its adapter has {} values per replica and node 0's {}", theirs.width, own.width));
    }
    None
}

/// A node other than 0: connects to node 0, retrying while it starts.
fn connect(nodes: &Nodes) -> Result<TcpStream> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        let addrs =
            nodes.address.to_socket_addrs().map_err(|e| Error::Unsupported(format!("train.nodes.address {:?}: {e}", nodes.address)))?;
        for addr in addrs {
            if let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Unsupported(format!(
                "train.nodes: node 0 did not answer at {} within {} s",
                nodes.address,
                JOIN_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn lost(rank: u32, other: usize, doing: &str, e: std::io::Error) -> Error {
    Error::Unsupported(format!("train.nodes: node {rank} lost node {other} while {doing}: {e}"))
}

fn write_frame(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(bytes.len() as u64).to_le_bytes())?;
    stream.write_all(bytes)?;
    stream.flush()
}

/// A frame of at most `max` bytes; a longer length is refused before anything is allocated.
fn read_frame(stream: &mut TcpStream, max: u64) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes, at most {max} expected")));
    }
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

fn to_bytes(floats: &[f32]) -> Vec<u8> {
    floats.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn floats(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(rank: u32, port: u16) -> Nodes {
        Nodes { count: 3, rank, address: format!("127.0.0.1:{port}") }
    }

    fn run() -> RunIdentity {
        let keys = [("lora.rank".to_string(), "8".to_string())].into_iter().collect();
        RunIdentity { keys, dataset: "d".into(), eval_dataset: None, first_step: 0 }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Three nodes gather their blocks in rank order, twice in a row (the second exchange is
    /// where burn-collective's global all-reduce hangs).
    #[test]
    fn three_nodes_gather_every_block_in_rank_order() {
        let port = free_port();
        let threads: Vec<_> = (0..3u32)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut link = NodeLink::join(&nodes(rank, port), 2, 3, &run()).unwrap();
                    (0..2)
                        .map(|step| {
                            let block: Vec<f32> = (0..6).map(|i| (rank * 100 + step * 10 + i) as f32).collect();
                            link.all_gather(&block).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let got: Vec<Vec<Vec<f32>>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for step in 0..2u32 {
            let want: Vec<f32> = (0..3u32).flat_map(|r| (0..6).map(move |i| (r * 100 + step * 10 + i) as f32)).collect();
            for (rank, g) in got.iter().enumerate() {
                assert_eq!(g[step as usize], want, "node {rank}, exchange {step}");
            }
        }
    }

    /// A node whose recipe differs is refused by name of the key, and its place stays open for
    /// the right one; a node resuming from another step is refused too.
    #[test]
    fn a_node_training_another_run_is_refused() {
        let port = free_port();
        let zero = std::thread::spawn(move || NodeLink::join(&nodes(0, port), 1, 3, &run()).map(|_| ()));
        let mut other = run();
        other.keys.insert("lora.rank".into(), "16".into());
        let e = NodeLink::join(&nodes(1, port), 1, 3, &other).err().unwrap().to_string();
        assert!(e.contains("refused") && e.contains("recipe differs") && e.contains("lora.rank"), "{e}");
        let mut later = run();
        later.first_step = 3;
        let e = NodeLink::join(&nodes(1, port), 1, 3, &later).err().unwrap().to_string();
        assert!(e.contains("starts at step 3 and node 0 at step 0"), "{e}");
        let two = std::thread::spawn(move || NodeLink::join(&nodes(2, port), 1, 3, &run()).map(|_| ()));
        NodeLink::join(&nodes(1, port), 1, 3, &run()).unwrap();
        zero.join().unwrap().unwrap();
        two.join().unwrap().unwrap();
    }

    /// A length prefix larger than what the receiver expects is refused before allocating.
    #[test]
    fn an_oversized_frame_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&u64::MAX.to_le_bytes()).unwrap();
        });
        let (mut s, _) = listener.accept().unwrap();
        let e = read_frame(&mut s, 1024).unwrap_err();
        assert!(e.to_string().contains("at most 1024"), "{e}");
        sender.join().unwrap();
    }
}
