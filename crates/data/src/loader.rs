//! The threaded loader: a fixed batch plan per epoch (shuffled, grouped by bucket) and worker
//! threads that decode and transform samples ahead of the trainer.
//!
//! Which items form step `s`'s batch and how each is flipped and cropped are pure functions of
//! `(seed, s)`, so any number of workers, finishing in any order, give the same batches, and a run
//! resumed at step `s` sees exactly the batches an uninterrupted run would have seen there.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tch::Tensor;

use crate::dataset::{Dataset, Sample, SampleKey};
use crate::rng::Rng;
use crate::{Error, Result};

/// Batching and threading options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Seed of the epoch shuffles and of every per-step random draw.
    pub seed: u64,
    /// Shuffle items each epoch (else source order).
    pub shuffle: bool,
    /// Drop each bucket's last incomplete batch (constant batch shapes, e.g. for CUDA graphs).
    pub drop_last: bool,
    /// Worker threads decoding and transforming.
    pub workers: usize,
    /// Batches prepared ahead of the one being consumed.
    pub prefetch: usize,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
impl LoaderConfig {
    /// Sets [`LoaderConfig::batch_size`].
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets [`LoaderConfig::seed`].
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets [`LoaderConfig::shuffle`].
    #[must_use]
    pub fn with_shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Sets [`LoaderConfig::drop_last`].
    #[must_use]
    pub fn with_drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Sets [`LoaderConfig::workers`].
    #[must_use]
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Sets [`LoaderConfig::prefetch`].
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }
}

impl LoaderConfig {
    /// Batches of `batch_size`, shuffled with `seed`, incomplete batches kept, one worker per core.
    pub fn new(batch_size: usize, seed: u64) -> Self {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            batch_size,
            seed,
            shuffle: true,
            drop_last: false,
            workers,
            prefetch: 2,
        }
    }
}

/// One step's batch.
#[derive(Debug)]
pub struct Batch {
    /// The global step (0-based).
    pub step: u64,
    /// The epoch the step belongs to.
    pub epoch: u64,
    /// Pixels `[batch, 3, height, width]` in `[-1, 1]`, all of one bucket.
    pub pixels: Tensor,
    /// The samples (their `pixels` are the rows of `Batch::pixels`).
    pub samples: Vec<Sample>,
}

/// Plans batches over a dataset and loads them, single-threaded ([`Loader::batch`]) or with workers
/// ([`Loader::iter`]).
#[derive(Debug, Clone)]
pub struct Loader {
    dataset: Arc<Dataset>,
    config: LoaderConfig,
    /// The items it deals from (all of the dataset's unless [`Loader::over_items`]).
    members: Arc<[usize]>,
    steps_per_epoch: u64,
}

const STREAM_EPOCH: u64 = 10;

impl Loader {
    /// A loader over `dataset`; fails when the options leave no batch in an epoch.
    pub fn new(dataset: Arc<Dataset>, config: LoaderConfig) -> Result<Self> {
        let members = (0..dataset.len()).collect();
        Self::over_items(dataset, config, members)
    }

    /// A loader dealing only `items` of `dataset` (e.g. its instance images, or its class images);
    /// fails when the options leave no batch in an epoch or an item is outside the dataset.
    pub fn over_items(
        dataset: Arc<Dataset>,
        config: LoaderConfig,
        items: Vec<usize>,
    ) -> Result<Self> {
        if let Some(&outside) = items.iter().find(|&&i| i >= dataset.len()) {
            return Err(Error::InvalidOption {
                option: "item",
                problem: format!("{outside} is past the {} items", dataset.len()),
            });
        }
        if config.batch_size == 0 {
            return Err(Error::InvalidOption {
                option: "batch_size",
                problem: "must be positive".into(),
            });
        }
        let mut loader = Self {
            dataset,
            config,
            members: items.into(),
            steps_per_epoch: 0,
        };
        loader.steps_per_epoch = loader.epoch_plan(0).len() as u64;
        if loader.steps_per_epoch == 0 {
            return Err(Error::EmptySelection {
                reason: format!(
                    "no bucket holds a full batch of {} and drop_last is on ({} items)",
                    config.batch_size,
                    loader.members.len()
                ),
            });
        }
        Ok(loader)
    }

    /// Batches per epoch (the same in every epoch).
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// The item indices of every batch of `epoch`: items (each [`crate::Item::repeats`] ×
    /// [`crate::DatasetConfig::repeats`] times) are shuffled with
    /// `(seed, epoch)` and dealt into per-bucket batches in that order; incomplete batches follow in
    /// bucket order unless dropped.
    pub fn epoch_plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        let repeats = self.dataset.config().repeats as usize;
        let items = self.dataset.items();
        let mut order: Vec<usize> = (self.members.iter())
            .flat_map(|&i| std::iter::repeat_n(i, repeats * items[i].repeats as usize))
            .collect();
        if self.config.shuffle {
            Rng::keyed(self.config.seed, &[STREAM_EPOCH, epoch]).shuffle(&mut order);
        }
        let buckets = self.dataset.config().buckets.sizes().len();
        let mut pending: Vec<Vec<usize>> = vec![Vec::new(); buckets];
        let mut batches = Vec::new();
        for item in order {
            let bucket = &mut pending[self.dataset.items()[item].bucket];
            bucket.push(item);
            if bucket.len() == self.config.batch_size {
                batches.push(std::mem::take(bucket));
            }
        }
        if !self.config.drop_last {
            batches.extend(pending.into_iter().filter(|b| !b.is_empty()));
        }
        batches
    }

    /// The sample keys of global step `step`.
    pub fn step_keys(&self, step: u64) -> (u64, Vec<SampleKey>) {
        let epoch = step / self.steps_per_epoch;
        let index = (step % self.steps_per_epoch) as usize;
        let plan = self.epoch_plan(epoch);
        let keys = plan[index]
            .iter()
            .enumerate()
            .map(|(slot, &item)| SampleKey {
                seed: self.config.seed,
                step,
                slot: slot as u32,
                item,
            })
            .collect();
        (epoch, keys)
    }

    /// Loads step `step`'s batch on the calling thread.
    pub fn batch(&self, step: u64) -> Result<Batch> {
        let (epoch, keys) = self.step_keys(step);
        let samples = keys
            .iter()
            .map(|key| self.dataset.sample(key))
            .collect::<Result<Vec<_>>>()?;
        assemble(step, epoch, samples)
    }

    /// Loads steps `start..end` with the worker threads, in order.
    pub fn iter(&self, start: u64, end: u64) -> Batches {
        let (job_sender, job_receiver) = channel::<Job>();
        let (result_sender, result_receiver) = channel::<Done>();
        let job_receiver = Arc::new(Mutex::new(job_receiver));
        let workers = (0..self.config.workers.max(1))
            .map(|_| {
                let dataset = Arc::clone(&self.dataset);
                let jobs = Arc::clone(&job_receiver);
                let results = result_sender.clone();
                std::thread::spawn(move || work(&dataset, &jobs, &results))
            })
            .collect();
        Batches {
            loader: self.clone(),
            jobs: Some(job_sender),
            results: result_receiver,
            workers,
            next_step: start,
            next_dispatch: start,
            end,
            pending: BTreeMap::new(),
            started: Instant::now(),
            images: 0,
        }
    }
}

struct Job {
    epoch: u64,
    key: SampleKey,
    batch_len: usize,
}

struct Done {
    epoch: u64,
    key: SampleKey,
    batch_len: usize,
    sample: Result<Sample>,
}

fn work(dataset: &Dataset, jobs: &Mutex<Receiver<Job>>, results: &Sender<Done>) {
    loop {
        // The lock is held only while taking a job, not while working on it.
        let job = match jobs.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return,
        };
        let Ok(Job {
            epoch,
            key,
            batch_len,
        }) = job
        else {
            return;
        };
        let sample = dataset.sample(&key);
        if results
            .send(Done {
                epoch,
                key,
                batch_len,
                sample,
            })
            .is_err()
        {
            return;
        }
    }
}

fn assemble(step: u64, epoch: u64, samples: Vec<Sample>) -> Result<Batch> {
    // One tensor per batch, made on the consumer's thread (the workers stay out of libtorch).
    let (height, width) = samples
        .first()
        .map_or((0, 0), |s| (s.pixels.height(), s.pixels.width()));
    let mut data = Vec::with_capacity(samples.len() * 3 * height as usize * width as usize);
    for sample in &samples {
        data.extend_from_slice(sample.pixels.data());
    }
    let shape = [samples.len() as i64, 3, i64::from(height), i64::from(width)];
    let pixels = Tensor::f_from_slice(&data)?.f_view(shape)?;
    Ok(Batch {
        step,
        epoch,
        pixels,
        samples,
    })
}

/// Batches in step order from the worker threads; see [`Loader::iter`].
pub struct Batches {
    loader: Loader,
    jobs: Option<Sender<Job>>,
    results: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    next_step: u64,
    next_dispatch: u64,
    end: u64,
    pending: BTreeMap<u64, (u64, usize, Vec<Option<Sample>>)>,
    started: Instant,
    images: u64,
}

impl Batches {
    /// Images delivered per second of wall time since the iterator was made.
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// Images delivered so far.
    pub fn images(&self) -> u64 {
        self.images
    }

    fn dispatch_ahead(&mut self) -> Result<()> {
        let horizon = self
            .next_step
            .saturating_add(self.loader.config.prefetch as u64 + 1)
            .min(self.end);
        while self.next_dispatch < horizon {
            let step = self.next_dispatch;
            let (epoch, keys) = self.loader.step_keys(step);
            let batch_len = keys.len();
            let jobs = self
                .jobs
                .as_ref()
                .ok_or_else(|| Error::Worker("loader is shut down".into()))?;
            for key in keys {
                jobs.send(Job {
                    epoch,
                    key,
                    batch_len,
                })
                .map_err(|_| Error::Worker("every worker thread has stopped".into()))?;
            }
            self.next_dispatch += 1;
        }
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Batch> {
        self.dispatch_ahead()?;
        let step = self.next_step;
        loop {
            if let Some((_, batch_len, samples)) = self.pending.get(&step)
                && samples.iter().filter(|s| s.is_some()).count() == *batch_len
            {
                break;
            }
            let done = self
                .results
                .recv()
                .map_err(|_| Error::Worker("every worker thread has stopped".into()))?;
            let sample = done.sample?;
            let entry = self.pending.entry(done.key.step).or_insert_with(|| {
                (
                    done.epoch,
                    done.batch_len,
                    (0..done.batch_len).map(|_| None).collect(),
                )
            });
            if let Some(slot) = entry.2.get_mut(done.key.slot as usize) {
                *slot = Some(sample);
            }
        }
        let (epoch, _, samples) = self.pending.remove(&step).unwrap_or_default();
        let samples: Vec<Sample> = samples.into_iter().flatten().collect();
        self.next_step += 1;
        self.images += samples.len() as u64;
        assemble(step, epoch, samples)
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next_step >= self.end {
            return None;
        }
        let batch = self.next_batch();
        if batch.is_err() {
            // A failed sample ends the iteration: later steps would be out of order.
            self.end = self.next_step;
        }
        Some(batch)
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Closing the job channel lets every worker finish its current sample and return.
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
