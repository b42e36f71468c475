//! `--profile_step`: one optimizer step timed between two device synchronizations (how long the
//! host took to enqueue its work, how long until the device finished it), or recorded by libtorch's
//! profiler.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::Device;

use crate::checkpoint::io_error;
use crate::throughput::Throughput;
use crate::{Error, Result};

/// CPU time of the calling thread so far, from Linux's `/proc/thread-self/schedstat` (nanoseconds)
/// where the kernel keeps it, else `/proc/thread-self/stat` (user + system time in 1/100 s, the
/// fixed unit of /proc); `None` where neither can be read.
fn thread_cpu_seconds() -> Option<f64> {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat").ok();
    if let Some(nanos) = schedstat
        .as_deref()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        && nanos > 0.0
    {
        return Some(nanos * 1e-9);
    }
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// `--profile_step`: one optimizer step between two device synchronizations, timed on the host
/// (how long enqueueing its work took, and how long until the device finished it), optionally
/// recorded by libtorch's profiler.
pub(crate) struct StepProbe {
    device: Device,
    step: u64,
    started: Instant,
    cpu_started: Option<f64>,
    profiler: Option<(torch_cuda::Profiler, PathBuf)>,
    /// How long each graph launch of the step took on the host, s (each onto an idle device).
    launches: Vec<f64>,
    /// Time spent waiting for the device before those launches, s.
    waited: f64,
}

impl StepProbe {
    pub(crate) fn begin(
        device: Device,
        record: bool,
        output_dir: &Path,
        step: u64,
    ) -> Result<StepProbe> {
        Self::synchronize(device);
        let profiler = if record {
            let dir = output_dir.join("profile");
            std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
            let options = torch_cuda::ProfilerOptions::default()
                .with_cuda(device.is_cuda())
                .with_shapes(true)
                .with_memory(true);
            let profiler = torch_cuda::Profiler::start(options).map_err(Error::Profile)?;
            Some((profiler, dir.join(format!("step-{step}.json"))))
        } else {
            None
        };
        Ok(StepProbe {
            device,
            step,
            started: Instant::now(),
            cpu_started: thread_cpu_seconds(),
            profiler,
            launches: Vec::new(),
            waited: 0.0,
        })
    }

    fn synchronize(device: Device) {
        if let Device::Cuda(index) = device {
            torch_cuda::graph::synchronize(index);
        }
    }

    /// Waits for the device, stops the profiler, and describes the step (with its model FLOPs per
    /// second and MFU over the time the device took, from `throughput`).
    pub(crate) fn end(self, captured: bool, throughput: &Throughput) -> Result<String> {
        let enqueued = self.started.elapsed().as_secs_f64() - self.waited;
        let cpu = self
            .cpu_started
            .zip(thread_cpu_seconds())
            .map(|(a, b)| b - a);
        Self::synchronize(self.device);
        let finished = self.started.elapsed().as_secs_f64();
        let mode = if captured { "graph replay" } else { "eager" };
        match self.profiler {
            Some((profiler, path)) => {
                profiler.finish(&path).map_err(Error::Profile)?;
                Ok(format!(
                    "step {} ({mode}) recorded by the profiler ({:.1} ms with its overhead): {}",
                    self.step,
                    finished * 1e3,
                    path.display()
                ))
            }
            None if self.launches.is_empty() => Ok(format!(
                "step {} ({mode}): the host enqueued its work in {:.1} ms ({}); the device finished it {:.1} ms after the start; {}",
                self.step,
                enqueued * 1e3,
                cpu.map_or("its CPU time unknown".to_owned(), |c| format!(
                    "{:.1} ms of CPU time, {:.1} % of the step",
                    c * 1e3,
                    100.0 * c / finished
                )),
                finished * 1e3,
                throughput.describe(finished),
            )),
            // Graphs: a launch returns only once the device's queue has room for the graph's work, so
            // in a pipelined step the later launches mostly wait for the device. The probed step
            // therefore launches each graph onto an idle device, which times the host's own work;
            // the device was idle for about that long, so its busy time is the rest.
            None => {
                let each: Vec<String> = self
                    .launches
                    .iter()
                    .map(|s| format!("{:.2}", s * 1e3))
                    .collect();
                let busy = finished - enqueued;
                Ok(format!(
                    "step {} ({mode}, each graph launched onto an idle device): the host's own work took {:.1} ms \
                     (graph launches {} ms), {:.1} % of the {:.1} ms the device was busy; over those: {}",
                    self.step,
                    enqueued * 1e3,
                    each.join(", "),
                    100.0 * enqueued / busy,
                    busy * 1e3,
                    throughput.describe(busy),
                ))
            }
        }
    }
}

/// Replays a graph; when a probe watches the step, onto an idle device, timing the launch.
pub(super) fn timed_launch(
    probe: &mut Option<StepProbe>,
    replay: impl FnOnce() -> std::result::Result<(), torch_cuda::Error>,
) -> Result<()> {
    if let Some(probe) = probe.as_mut() {
        let waiting = Instant::now();
        StepProbe::synchronize(probe.device);
        probe.waited += waiting.elapsed().as_secs_f64();
    }
    let started = Instant::now();
    replay().map_err(Error::CudaGraph)?;
    if let Some(probe) = probe {
        probe.launches.push(started.elapsed().as_secs_f64());
    }
    Ok(())
}
