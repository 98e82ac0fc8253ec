//! Bench (not a test) of the coordination layer alone: the PostgreSQL queue, the workers'
//! claims and leases, the API side's tickets and the store, with no model. Each worker runs
//! a bench-only `Sleeper` pipeline that waits a fixed 200 ms per job and draws an image; it
//! is never registered as a servable model.
//!
//! (b) jobs/s at 1, 4, 16 and 64 workers against 2 API-side queues, against the ideal
//!     (workers / 0.2 s), 25 jobs per worker (`PICTOR_BENCH_JOBS_PER_WORKER`);
//! (c) the latency the cluster adds to one job over a local queue, p50 and p99, with a
//!     small image (it travels in the job's row) and a large one (through the store).
//!
//! Needs PostgreSQL and S3: it starts them with `scripts/services up`.
//! Run: `cargo bench -p pictor-cluster --bench coordination`.

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use pictor_cluster::{Cluster, QueueOptions, SharedQueue, Worker, WorkerModel, WorkerOptions};
use pictor_core::{
    Control, Dimensions, Generation, GenerationRequest, ModelRules, Pipeline, Progress, RgbImage,
};
use pictor_sched::{JobQueue, ModelQueue, QueueConfig};
use pictor_store::{Blobs, Db, S3Options};
use tokio::sync::watch;

const JOB: Duration = Duration::from_millis(200);
const MODEL: &str = "sleeper";

/// Bench-only: waits `JOB` per request, draws a `side`² image: flat grey (its PNG small
/// enough to travel in the job's row) or noise (a PNG past that bound, through the store).
#[derive(Clone, Copy)]
struct Sleeper {
    side: usize,
    noise: bool,
}

/// The (b) and first (c) image: 16² grey.
const SMALL: Sleeper = Sleeper {
    side: 16,
    noise: false,
};
/// The second (c) image: 512² noise, about 770 KiB as PNG, as large as a real result.
const LARGE: Sleeper = Sleeper {
    side: 512,
    noise: true,
};

impl Sleeper {
    /// A local queue running this sleeper, one job at a time.
    fn queue(self) -> ModelQueue {
        ModelQueue::start(
            MODEL,
            Box::new(self),
            QueueConfig {
                depth: 4,
                timeout: Duration::from_secs(600),
                batch_images: 1,
            },
        )
    }

    fn image(&self) -> RgbImage {
        let len = self.side * self.side * 3;
        let pixels = if self.noise {
            (0..len)
                .map(|i| ((i * 2_654_435_761) >> 13) as u8)
                .collect()
        } else {
            vec![128; len]
        };
        RgbImage {
            width: self.side,
            height: self.side,
            pixels,
        }
    }
}

impl Pipeline for Sleeper {
    fn rules(&self) -> ModelRules {
        ModelRules {
            family: "FLUX.1-schnell".into(),
            multiple: 16,
            min_side: 16,
            max_side: 16,
            max_pixels: 256,
            default_size: Dimensions::new(16, 16),
            default_steps: 1,
            max_steps: 1,
            default_guidance: None,
            takes_negative_prompt: false,
            takes_loras: false,
        }
    }

    fn generate_batch(
        &mut self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> pictor_core::Result<Vec<Generation>> {
        let _ = progress;
        Ok(reqs
            .iter()
            .map(|r| {
                std::thread::sleep(JOB);
                Generation {
                    images: vec![self.image(); r.n],
                    prompt: Default::default(),
                    phases: Default::default(),
                    device: String::new(),
                    loras: Vec::new(),
                }
            })
            .collect())
    }

    fn compatible(&self, _: &GenerationRequest, _: &GenerationRequest) -> bool {
        false
    }
}

fn services(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/services");
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("scripts/services");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exported(env: &str, name: &str) -> String {
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("export {name}=")))
        .unwrap_or_else(|| panic!("scripts/services env has no {name}"))
        .to_string()
}

fn request() -> GenerationRequest {
    GenerationRequest {
        prompt: "bench".into(),
        width: 16,
        height: 16,
        steps: 1,
        seed: 1,
        n: 1,
        ..Default::default()
    }
}

/// Jobs per worker in (b) (`PICTOR_BENCH_JOBS_PER_WORKER`, default 25: five seconds of
/// work each, so the start and the tail weigh little).
fn per_worker() -> usize {
    std::env::var("PICTOR_BENCH_JOBS_PER_WORKER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Setup {
    url: String,
    s3: S3Options,
}

impl Setup {
    async fn cluster(&self, node: &str, connections: u32) -> Cluster {
        let blobs = Blobs::s3(&self.s3).expect("the bucket");
        Cluster::connect_with(&self.url, blobs, node, connections)
            .await
            .expect("PostgreSQL")
    }

    /// `n` workers with one `sleeper` each.
    async fn workers(&self, n: usize, sleeper: Sleeper) -> Workers {
        let (stop, stopped) = watch::channel(false);
        let mut handles = Vec::new();
        for i in 0..n {
            let cluster = self.cluster(&format!("bench-worker-{i}"), 2).await;
            let model = WorkerModel {
                name: MODEL.into(),
                queue: Arc::new(sleeper.queue()),
                rules: sleeper.rules(),
                hash: None,
                capacity: 1,
            };
            let mut stopped = stopped.clone();
            let worker = Worker::new(cluster, vec![model], WorkerOptions::default());
            handles.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                if let Err(e) = worker.run(shutdown).await {
                    eprintln!("bench worker: {e}");
                }
            }));
        }
        Workers { stop, handles }
    }
}

/// Running bench workers.
struct Workers {
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    /// Stops them and waits until each has.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for h in self.handles {
            let _ = h.await;
        }
    }
}

async fn throughput(setup: &Setup, apis: &[Arc<SharedQueue>], workers: usize) -> (usize, f64) {
    let running = setup.workers(workers, SMALL).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let jobs = (workers * per_worker()).max(16);
    let start = Instant::now();
    let mut waits = Vec::new();
    // Clients submit at once, as many clients would.
    for i in 0..jobs {
        let api = Arc::clone(&apis[i % apis.len()]);
        waits.push(tokio::spawn(async move {
            api.submit(request()).await.expect("admitted").wait().await
        }));
    }
    for w in waits {
        w.await.expect("join").expect("a job's outcome");
    }
    let secs = start.elapsed().as_secs_f64();
    running.stop().await;
    (jobs, jobs as f64 / secs)
}

/// p50 and p99 of a job's time past `JOB`, on a local queue and through the cluster.
async fn added_latency(
    setup: &Setup,
    api: &SharedQueue,
    sleeper: Sleeper,
) -> Vec<(&'static str, f64, f64)> {
    let local = sleeper.queue();
    let running = setup.workers(1, sleeper).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rows = Vec::new();
    for (label, queue) in [
        ("local", &local as &dyn JobQueue),
        ("cluster", api as &dyn JobQueue),
    ] {
        let mut added = Vec::new();
        for _ in 0..50 {
            let start = Instant::now();
            let ticket = queue.submit(request()).await.expect("admitted");
            ticket.wait().await.expect("outcome");
            added.push((start.elapsed().as_secs_f64() - JOB.as_secs_f64()) * 1000.0);
        }
        added.sort_by(f64::total_cmp);
        rows.push((label, percentile(&added, 0.5), percentile(&added, 0.99)));
    }
    running.stop().await;
    rows
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PICTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        services(&["up"]);
        let env = services(&["env"]);
        let base = exported(&env, "PICTOR_DATABASE_URL");
        // SAFETY: set before any other thread reads the environment.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", exported(&env, "AWS_ACCESS_KEY_ID"));
            std::env::set_var(
                "AWS_SECRET_ACCESS_KEY",
                exported(&env, "AWS_SECRET_ACCESS_KEY"),
            );
        }
        let name = format!("pictor_bench_{}", std::process::id());
        let admin = Db::connect_only(&base).await.expect("PostgreSQL");
        let _ = admin;
        let status = Command::new("psql")
            .args([&base, "-qc", &format!("CREATE DATABASE {name}")])
            .status()
            .expect("psql");
        assert!(status.success());
        let url = format!("{}/{name}", base.rsplit_once('/').expect("a path").0);
        Db::connect(&url).await.expect("migrated");
        let setup = Setup {
            url: url.clone(),
            s3: S3Options {
                url: format!("s3://pictor/{name}"),
                endpoint: Some(exported(&env, "PICTOR_STORAGE__ENDPOINT")),
                region: Some(exported(&env, "PICTOR_STORAGE__REGION")),
            },
        };
        let options = QueueOptions {
            depth: 100_000,
            timeout: Duration::from_secs(600),
            max_attempts: 3,
        };
        let mut apis = Vec::new();
        for i in 0..2 {
            let cluster = setup.cluster(&format!("bench-api-{i}"), 16).await;
            apis.push(Arc::new(SharedQueue::new(&cluster, MODEL, options.clone())));
        }
        println!(
            "(b) jobs of {} ms through 2 API-side queues",
            JOB.as_millis()
        );
        println!("workers  jobs  jobs/s  ideal  share");
        for workers in [1usize, 4, 16, 64] {
            let (jobs, rate) = throughput(&setup, &apis, workers).await;
            let ideal = workers as f64 / JOB.as_secs_f64();
            println!(
                "{workers:>7}  {jobs:>4}  {rate:>6.1}  {ideal:>5.0}  {:>4.0}%",
                100.0 * rate / ideal
            );
        }

        println!(
            "(c) latency added to one {} ms job (50 jobs each, one at a time)",
            JOB.as_millis()
        );
        let large = pictor_image::encode(&LARGE.image(), pictor_image::Format::Png, 100, "");
        let large = large.expect("a PNG").len();
        assert!(large > 256 * 1024, "the large image goes through the store");
        println!(
            "image             queue    p50 ms  p99 ms  (large PNG: {} KiB)",
            large / 1024
        );
        for (label, sleeper) in [("16² grey (row)", SMALL), ("512² noise (S3)", LARGE)] {
            let rows = added_latency(&setup, &apis[0], sleeper).await;
            for (queue, p50, p99) in &rows {
                println!("{label:<16}  {queue:<7}  {p50:>6.1}  {p99:>6.1}");
            }
            println!(
                "{label:<16}  added by the cluster: p50 {:.1} ms, p99 {:.1} ms",
                rows[1].1 - rows[0].1,
                rows[1].2 - rows[0].2
            );
        }
    });
}
