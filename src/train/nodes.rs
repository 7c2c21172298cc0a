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

/// Bumped whenever the frames change, so that two tune versions refuse each other clearly.
const PROTOCOL: u32 = 1;
/// A hello is a few kilobytes; anything far larger is not one.
const MAX_HELLO: u64 = 1 << 20;
/// How long node 0 waits for a hello on a new connection (a stray one sends none).
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// The length that announces an abort instead of a frame: a frame with the reason follows.
const ABORT: u64 = u64::MAX;
const MAX_REASON: u64 = 1 << 12;

/// What must be the same on every node for the nodes to train as one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// The recipe's keys that change what is trained (paths, which may differ between machines,
    /// and the keys a resume may change are left out), with their values.
    pub keys: BTreeMap<String, String>,
    /// The training data's fingerprint, and the eval set's.
    pub dataset: String,
    pub eval_dataset: Option<String>,
    /// The model's config.json's fingerprint.
    pub model_config: String,
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
    /// Nodes in all.
    count: usize,
}

impl NodeLink {
    /// Joins the run: node 0 waits for every other node's hello and checks that they train the
    /// same run as it does; each other node connects to node 0 and waits for its answer.
    pub fn join(nodes: &Nodes, replicas: usize, width: usize, run: &RunIdentity) -> Result<NodeLink> {
        let hello = Hello { protocol: PROTOCOL, rank: nodes.rank, count: nodes.count, replicas, width, run: run.clone() };
        if nodes.rank == 0 {
            let streams = gather_hellos(nodes, &hello)?;
            Ok(NodeLink { rank: 0, streams, count: nodes.count as usize })
        } else {
            let mut stream = connect(nodes)?;
            write_frame(&mut stream, &serde_json::to_vec(&hello).expect("a hello serialises"))
                .map_err(|e| lost(nodes.rank, 0, "saying hello", e))?;
            let answer = read_frame(&mut stream, MAX_HELLO).map_err(|e| lost(nodes.rank, 0, "waiting for the others to join", e))?;
            let welcome: Welcome = serde_json::from_slice(&answer)
                .map_err(|e| Error::Unsupported(format!("train.nodes: node 0 answered with something that is not tune's: {e}")))?;
            welcome.map_err(|why| Error::Unsupported(format!("train.nodes: node 0 refused this node: {why}")))?;
            Ok(NodeLink { rank: nodes.rank, streams: vec![stream], count: nodes.count as usize })
        }
    }

    /// Every node's block, in rank order, given this node's; every node's block has the same
    /// length. When node 0 loses a node, it tells the others which before it stops.
    pub fn all_gather(&mut self, block: &[f32]) -> Result<Vec<f32>> {
        let bytes = block.len() as u64 * 4;
        let whole = bytes * self.count as u64;
        if self.rank == 0 {
            let mut all = Vec::with_capacity(block.len() * self.count);
            all.extend_from_slice(block);
            for i in 0..self.streams.len() {
                let frame = match read_block(&mut self.streams[i], bytes) {
                    Ok(frame) => frame,
                    Err(e) => {
                        let e = lost(0, i + 1, "gathering the gradients", e);
                        self.abort(&e.to_string());
                        return Err(e);
                    }
                };
                all.extend(floats(&frame));
            }
            let out = crate::peft::f32_bytes(&all);
            for i in 0..self.streams.len() {
                if let Err(e) = write_frame(&mut self.streams[i], &out) {
                    let e = lost(0, i + 1, "sending the gradients back", e);
                    self.abort(&e.to_string());
                    return Err(e);
                }
            }
            Ok(all)
        } else {
            let rank = self.rank;
            let stream = &mut self.streams[0];
            write_frame(stream, &crate::peft::f32_bytes(block)).map_err(|e| lost(rank, 0, "sending its gradients", e))?;
            let frame = read_block(stream, whole).map_err(|e| lost(rank, 0, "waiting for the gradients", e))?;
            Ok(floats(&frame).collect())
        }
    }

    /// Node 0: tells every node still connected why the run stops (best effort).
    fn abort(&mut self, why: &str) {
        for stream in &mut self.streams {
            let _ = stream.write_all(&ABORT.to_le_bytes()).and_then(|_| write_frame(stream, why.as_bytes()));
        }
    }
}

/// Node 0: accepts a connection and a hello from every other node, checks each against its
/// own, and answers all of them once all are in.
fn gather_hellos(nodes: &Nodes, own: &Hello) -> Result<Vec<TcpStream>> {
    let port = nodes.port().expect("the recipe checked train.nodes.address");
    let any = if nodes.address.starts_with('[') { "::" } else { "0.0.0.0" };
    let listener =
        TcpListener::bind((any, port)).map_err(|e| Error::Unsupported(format!("train.nodes: node 0 cannot listen on port {port}: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| Error::Unsupported(format!("train.nodes: {e}")))?;
    let others = nodes.count as usize - 1;
    let mut joined: Vec<Option<TcpStream>> = (0..others).map(|_| None).collect();
    // Why each rank was last refused, for the message if it never joins.
    let mut refused: Vec<Option<String>> = vec![None; others];
    let deadline = Instant::now() + Duration::from_secs(nodes.join_timeout_s);
    while joined.iter().any(Option::is_none) {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = (0..others)
                        .filter(|&i| joined[i].is_none())
                        .map(|i| match &refused[i] {
                            Some(why) => format!("{} (refused: {why})", i + 1),
                            None => (i + 1).to_string(),
                        })
                        .collect();
                    return Err(Error::Unsupported(format!(
                        "train.nodes: waited {} s (train.nodes.join_timeout_s) on port {port} and node(s) {} did not join",
                        nodes.join_timeout_s,
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(Error::Unsupported(format!("train.nodes: node 0 cannot accept a connection: {e}"))),
        };
        let _ = stream.set_nonblocking(false);
        // A stray connection (a port scan, another program) is dropped, not fatal.
        let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
        let Ok(frame) = read_frame(&mut stream, MAX_HELLO) else { continue };
        let Ok(hello) = serde_json::from_slice::<Hello>(&frame) else { continue };
        let _ = stream.set_read_timeout(None);
        let refuse = |mut stream: TcpStream, why: String| {
            let _ = write_frame(&mut stream, &serde_json::to_vec(&Welcome::Err(why)).expect("serialises"));
        };
        if let Some(why) = mismatch(own, &hello) {
            if let Some(slot) = refused.get_mut((hello.rank as usize).wrapping_sub(1)) {
                *slot = Some(why.clone());
            }
            // Its place stays open for the same node, started again with the right recipe.
            refuse(stream, why);
            continue;
        }
        let rank = hello.rank as usize;
        if joined[rank - 1].is_some() {
            refuse(stream, format!("node {rank} joined twice: each node needs its own train.nodes.rank"));
            continue;
        }
        keep_alive(&stream);
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
    if theirs.run.model_config != own.run.model_config {
        return Some("its model's config.json differs from node 0's".into());
    }
    let differ = super::differing_keys(&own.run.keys, &theirs.run.keys);
    if !differ.is_empty() {
        return Some(format!("its recipe differs from node 0's in {}", differ.join(", ")));
    }
    if theirs.width != own.width {
        return Some(format!("its adapter has {} values per replica and node 0's {}", theirs.width, own.width));
    }
    None
}

/// A node other than 0: connects to node 0, retrying while it starts (and while its name does
/// not resolve yet).
fn connect(nodes: &Nodes) -> Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(nodes.join_timeout_s);
    let mut last = String::from("no answer");
    loop {
        match nodes.address.to_socket_addrs() {
            Ok(addrs) => {
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                        Ok(stream) => {
                            keep_alive(&stream);
                            return Ok(stream);
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            return Err(Error::Unsupported(format!(
                "train.nodes: node 0 did not answer at {} within {} s (train.nodes.join_timeout_s): {last}",
                nodes.address, nodes.join_timeout_s
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// No delay for small frames, and TCP keepalive, so that a node whose machine or network went
/// away (no connection closed) is noticed within about two minutes instead of never.
fn keep_alive(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
            // SAFETY: setsockopt on a socket this process owns, with a pointer to a live c_int
            // and its size.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    level,
                    name,
                    &value as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6);
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

/// A frame of at most `max` bytes; a longer length is refused before anything is allocated. An
/// abort from node 0 becomes an error carrying its reason.
fn read_frame(stream: &mut TcpStream, max: u64) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len == ABORT {
        let reason = read_frame(stream, MAX_REASON)?;
        return Err(std::io::Error::other(format!("node 0 stopped the run: {}", String::from_utf8_lossy(&reason))));
    }
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes, at most {max} expected")));
    }
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

/// A frame of exactly `len` bytes (a block of gradients, whose size both ends know).
fn read_block(stream: &mut TcpStream, len: u64) -> std::io::Result<Vec<u8>> {
    let frame = read_frame(stream, len)?;
    if frame.len() as u64 != len {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {} bytes, {len} expected", frame.len())));
    }
    Ok(frame)
}

fn floats(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(rank: u32, port: u16) -> Nodes {
        Nodes { count: 3, rank, address: format!("127.0.0.1:{port}"), join_timeout_s: 60 }
    }

    fn run() -> RunIdentity {
        let keys = [("lora.rank".to_string(), "8".to_string())].into_iter().collect();
        RunIdentity { keys, dataset: "d".into(), eval_dataset: None, model_config: "c".into(), first_step: 0 }
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

    /// A node that goes away mid-run: node 0 stops with an error naming it, and tells the
    /// other nodes which node it lost instead of leaving them waiting.
    #[test]
    fn a_lost_node_is_named_to_every_node() {
        let port = free_port();
        let gather = move |rank: u32| {
            std::thread::spawn(move || {
                let mut link = NodeLink::join(&nodes(rank, port), 1, 3, &run()).unwrap();
                link.all_gather(&[rank as f32; 3]).err().map(|e| e.to_string())
            })
        };
        let (zero, one) = (gather(0), gather(1));
        drop(NodeLink::join(&nodes(2, port), 1, 3, &run()).unwrap());
        let e = zero.join().unwrap().expect("node 0 fails");
        assert!(e.contains("node 0 lost node 2 while gathering"), "{e}");
        let e = one.join().unwrap().expect("node 1 fails");
        assert!(e.contains("node 0 stopped the run") && e.contains("lost node 2"), "{e}");
    }

    /// A length prefix larger than what the receiver expects is refused before allocating.
    #[test]
    fn an_oversized_frame_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&(u64::MAX - 1).to_le_bytes()).unwrap();
        });
        let (mut s, _) = listener.accept().unwrap();
        let e = read_frame(&mut s, 1024).unwrap_err();
        assert!(e.to_string().contains("at most 1024"), "{e}");
        sender.join().unwrap();
    }
}
