//! `--nproc_per_node N`: the trainer starts its own data-parallel processes, as `torchrun
//! --standalone --nproc-per-node N` would, for users without Python. Each child is the same
//! executable with the same arguments minus `--nproc_per_node`, and torchrun's variables set
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR=127.0.0.1`, `MASTER_PORT`: a free port). Their
//! output comes back line by line, prefixed by rank; when one exits with a failure the others are
//! killed and the launch fails naming that rank (torchrun's default: no restarts).

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::{Error, Result};

/// The flag, as the trainer's parser spells it.
pub const FLAG: &str = "--nproc_per_node";

/// Which stream of a child a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Its standard output.
    Stdout,
    /// Its standard error.
    Stderr,
}

/// `args` without `--nproc_per_node N` / `--nproc_per_node=N` (every occurrence): the children's
/// arguments.
pub fn child_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if arg == FLAG {
            skip_value = true;
        } else if !arg.starts_with(&format!("{FLAG}=")) {
            out.push(arg.clone());
        }
    }
    out
}

/// A TCP port on 127.0.0.1 that was free a moment ago (rank 0's store listens there).
///
/// # Errors
/// [`Error::Launch`] when no port can be bound.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| Error::Launch {
        problem: format!("no free port on 127.0.0.1 for MASTER_PORT: {e}"),
    })?;
    let port = listener.local_addr().map_err(|e| Error::Launch {
        problem: format!("no free port on 127.0.0.1 for MASTER_PORT: {e}"),
    })?;
    Ok(port.port())
}

/// Runs `nproc` copies of `program args`, ranks `0..nproc` on this machine, handing each line of
/// their output to `forward(rank, stream, line)`; returns when all succeeded, or as soon as one
/// failed (after killing and reaping the others).
///
/// # Errors
/// [`Error::Launch`]: a child that could not be started, or the first rank seen to fail, with
/// its exit status.
pub fn launch(
    program: &Path,
    args: &[String],
    nproc: usize,
    forward: &(dyn Fn(usize, Stream, &str) + Sync),
) -> Result<()> {
    let port = free_port()?;
    let mut children = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        match spawn(program, args, rank, nproc, port) {
            Ok(child) => children.push(child),
            Err(e) => {
                stop_all(&mut children);
                return Err(e);
            }
        }
    }
    std::thread::scope(|scope| {
        for (rank, child) in children.iter_mut().enumerate() {
            if let Some(out) = child.stdout.take() {
                scope.spawn(move || forward_lines(out, rank, Stream::Stdout, forward));
            }
            if let Some(err) = child.stderr.take() {
                scope.spawn(move || forward_lines(err, rank, Stream::Stderr, forward));
            }
        }
        let outcome = watch(&mut children);
        // The readers end when the children's pipes close: every child has exited or been killed.
        stop_all(&mut children);
        outcome
    })
}

fn spawn(program: &Path, args: &[String], rank: usize, nproc: usize, port: u16) -> Result<Child> {
    let mut command = Command::new(program);
    // As torchrun: one CPU thread per process unless the user chose (several processes each with
    // as many threads as cores would oversubscribe the CPU).
    if nproc > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
        command.env("OMP_NUM_THREADS", "1");
    }
    command
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", nproc.to_string())
        .env("LOCAL_WORLD_SIZE", nproc.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Launch {
            problem: format!("cannot start rank {rank} ({}): {e}", program.display()),
        })
}

fn forward_lines(
    pipe: impl Read,
    rank: usize,
    stream: Stream,
    forward: &(dyn Fn(usize, Stream, &str) + Sync),
) {
    for line in BufReader::new(pipe).lines() {
        match line {
            Ok(line) => forward(rank, stream, &line),
            Err(_) => break,
        }
    }
}

/// Polls the children until all succeeded or one failed.
fn watch(children: &mut [Child]) -> Result<()> {
    let mut done = vec![false; children.len()];
    loop {
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            let status = child.try_wait().map_err(|e| Error::Launch {
                problem: format!("cannot wait for rank {rank}: {e}"),
            })?;
            match status {
                Some(status) if status.success() => done[rank] = true,
                Some(status) => {
                    return Err(Error::Launch {
                        problem: format!(
                            "rank {rank} {}; stopped the other ranks",
                            describe(status)
                        ),
                    });
                }
                None => {}
            }
        }
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("was killed ({status})"),
    }
}

/// Kills the children still running and reaps them all.
fn stop_all(children: &mut [Child]) {
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests;
