//! Queue behaviour with a pipeline that blocks on a gate, so tests control timing.
//! (The pipeline here is a test double for the queue's plumbing; the real engine is tested
//! in pictor-engine and through the API.)

use std::sync::{Arc, Mutex, mpsc as std_mpsc};

use pictor_core::{Control, Dimensions, ModelRules, Phases, Progress, PromptInfo, preview_steps};

use super::*;

struct Gated {
    gate: Arc<Mutex<std_mpsc::Receiver<()>>>,
    steps_run: Arc<AtomicUsize>,
    batches: Arc<Mutex<Vec<Vec<String>>>>,
    idles: Arc<AtomicUsize>,
}

impl Pipeline for Gated {
    fn rules(&self) -> ModelRules {
        ModelRules {
            family: "FLUX.1-schnell".into(),
            multiple: 1,
            min_side: 1,
            max_side: 64,
            max_pixels: 64 * 64,
            default_size: Dimensions::new(1, 1),
            default_steps: 1,
            max_steps: 100,
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
        self.batches
            .lock()
            .unwrap()
            .push(reqs.iter().map(|r| r.prompt.clone()).collect());
        let steps = reqs[0].steps;
        for step in 0..=steps {
            // Each step waits for the test to open the gate once.
            let _ = self.gate.lock().unwrap().recv();
            if progress(Progress::Step {
                step,
                total: steps,
                first: 0,
                count: reqs.len(),
            }) == Control::Cancel
            {
                return Err(PipelineError::Cancelled);
            }
            for (request, r) in reqs.iter().enumerate() {
                let due = preview_steps(steps, r.previews);
                if let Some(index) = due.iter().position(|&s| s == step) {
                    let pixels = RgbImage {
                        width: 1,
                        height: 1,
                        pixels: vec![step as u8; 3],
                    };
                    progress(Progress::Preview {
                        request,
                        image: 0,
                        index,
                        step,
                        pixels: &pixels,
                    });
                }
            }
            self.steps_run.fetch_add(1, Ordering::Relaxed);
        }
        Ok(reqs
            .iter()
            .map(|r| Generation {
                images: vec![],
                prompt: PromptInfo {
                    encoded: r.prompt.clone(),
                    truncated: false,
                    pooled_truncated: false,
                    tokens: 0,
                },
                phases: Phases::default(),
                device: "test".into(),
                loras: Vec::new(),
            })
            .collect())
    }

    fn idle(&mut self) {
        self.idles.fetch_add(1, Ordering::Relaxed);
    }
}

fn req(steps: usize) -> GenerationRequest {
    named("p", steps)
}

fn named(prompt: &str, steps: usize) -> GenerationRequest {
    GenerationRequest {
        loras: Vec::new(),
        prompt: prompt.into(),
        width: 16,
        height: 16,
        steps,
        guidance: None,
        seed: 0,
        n: 1,
        previews: 0,
        edit: None,
    }
}

type Batches = Arc<Mutex<Vec<Vec<String>>>>;

fn queue_with(
    depth: usize,
    timeout: Duration,
    batch_images: usize,
) -> (ModelQueue, std_mpsc::Sender<()>, Arc<AtomicUsize>, Batches) {
    let (open, gate) = std_mpsc::channel();
    let steps_run = Arc::new(AtomicUsize::new(0));
    let batches = Batches::default();
    let p = Gated {
        gate: Arc::new(Mutex::new(gate)),
        steps_run: Arc::clone(&steps_run),
        batches: Arc::clone(&batches),
        idles: Arc::default(),
    };
    let config = QueueConfig {
        depth,
        timeout,
        batch_images,
    };
    (
        ModelQueue::start("test", Box::new(p), config),
        open,
        steps_run,
        batches,
    )
}

fn queue(depth: usize, timeout: Duration) -> (ModelQueue, std_mpsc::Sender<()>, Arc<AtomicUsize>) {
    let (q, open, steps, _) = queue_with(depth, timeout, 1);
    (q, open, steps)
}

async fn until(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition never became true");
}

#[tokio::test]
async fn full_queue_is_refused_with_a_retry_estimate_then_drains() {
    let (q, open, _) = queue(1, Duration::from_secs(60));
    let first = q.submit(req(1)).unwrap();
    until(|| q.running() == 1).await;
    let second = q.submit(req(1)).unwrap();
    match q.submit(req(1)) {
        Err(SubmitError::Overloaded { retry_after }) => {
            assert!(retry_after >= Duration::from_secs(1) && retry_after <= Duration::from_secs(60))
        }
        other => panic!("expected Overloaded, got {:?}", other.map(|_| ())),
    }
    for _ in 0..4 {
        open.send(()).unwrap();
    }
    assert!(first.wait().await.is_ok());
    assert!(second.wait().await.is_ok());
    assert!(q.submit(req(1)).is_ok(), "a place is free again");
}

/// Previews reach the job that asked for them, in order and before the result; a job in
/// the same batch that asked for none gets none.
#[tokio::test]
async fn previews_go_to_their_job_before_its_result() {
    let (q, open, _, _) = queue_with(4, Duration::from_secs(60), 4);
    let first = q.submit(req(4)).unwrap();
    until(|| q.running() == 1).await;
    let mut streamed = q
        .submit(GenerationRequest {
            previews: 2,
            ..named("streamed", 4)
        })
        .unwrap();
    let plain = q.submit(named("plain", 4)).unwrap();
    for _ in 0..10 {
        open.send(()).unwrap();
    }
    assert!(first.wait().await.is_ok());
    let mut steps = Vec::new();
    while let Some(p) = streamed.next_preview().await {
        assert_eq!(p.pixels.pixels[0] as usize, p.step);
        steps.push((p.index, p.step));
    }
    assert_eq!(steps, vec![(0, 1), (1, 3)]);
    assert!(streamed.next_preview().await.is_none());
    assert!(streamed.wait().await.is_ok());
    assert!(plain.wait().await.is_ok());
}

#[tokio::test]
async fn dropping_the_ticket_cancels_within_one_step() {
    let (q, open, steps_run) = queue(2, Duration::from_secs(60));
    let ticket = q.submit(req(10)).unwrap();
    open.send(()).unwrap(); // step 0 passes
    until(|| steps_run.load(Ordering::Relaxed) == 1).await;
    drop(ticket);
    open.send(()).unwrap(); // step 1's gate opens, then the flag is seen
    until(|| q.running() == 0).await;
    assert_eq!(
        steps_run.load(Ordering::Relaxed),
        1,
        "no further step after the cancel"
    );
    // The worker is free for the next job.
    let next = q.submit(req(0)).unwrap();
    open.send(()).unwrap();
    assert!(next.wait().await.is_ok());
}

#[tokio::test]
async fn a_job_past_its_deadline_times_out() {
    let (q, open, _) = queue(2, Duration::from_millis(50));
    let ticket = q.submit(req(3)).unwrap();
    open.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    for _ in 0..3 {
        let _ = open.send(());
    }
    assert!(matches!(ticket.wait().await, Err(JobError::TimedOut(_))));
}

#[tokio::test]
async fn shutdown_finishes_queued_work_and_refuses_new() {
    let (q, open, _) = queue(2, Duration::from_secs(60));
    let ticket = q.submit(req(1)).unwrap();
    for _ in 0..2 {
        open.send(()).unwrap();
    }
    assert!(q.shutdown(Duration::from_secs(5)).await);
    assert!(ticket.wait().await.is_ok());
    assert!(matches!(q.submit(req(1)), Err(SubmitError::Closed)));
}

#[tokio::test]
async fn compatible_waiting_jobs_run_in_one_batch_in_order() {
    let (q, open, _, batches) = queue_with(8, Duration::from_secs(60), 3);
    let a = q.submit(named("a", 1)).unwrap();
    until(|| q.running() == 1).await;
    // While `a` runs: two compatible jobs, one with other steps, one more compatible.
    let b = q.submit(named("b", 1)).unwrap();
    let c = q.submit(named("c", 2)).unwrap();
    let d = q.submit(named("d", 1)).unwrap();
    let e = q.submit(named("e", 1)).unwrap();
    until(|| q.waiting() == 4).await;
    for _ in 0..20 {
        let _ = open.send(());
    }
    for t in [a, b, c, d, e] {
        let outcome = t.wait().await.unwrap();
        assert_eq!(outcome.generation.images.len(), 0);
    }
    let got = batches.lock().unwrap().clone();
    // `b`, `d`, `e` share size and steps and fit the 3-image budget; `c` waits its turn.
    assert_eq!(got, vec![vec!["a"], vec!["b", "d", "e"], vec!["c"]]);
    assert_eq!(q.waiting(), 0);
}

/// After a long batch, with nothing waiting, the pipeline is told it is idle (the engine
/// hands its scratch memory back then); short batches do not pay for that.
#[tokio::test]
async fn a_long_batch_then_an_empty_queue_tells_the_pipeline_it_is_idle() {
    let (open, gate) = std_mpsc::channel();
    let idles = Arc::new(AtomicUsize::new(0));
    let p = Gated {
        gate: Arc::new(Mutex::new(gate)),
        steps_run: Arc::default(),
        batches: Arc::default(),
        idles: Arc::clone(&idles),
    };
    let config = QueueConfig {
        depth: 2,
        timeout: Duration::from_secs(60),
        batch_images: 1,
    };
    let q = ModelQueue::start("idle", Box::new(p), config);
    let short = q.submit(req(1)).unwrap();
    open.send(()).unwrap();
    open.send(()).unwrap();
    assert!(short.wait().await.is_ok());
    let long = q.submit(req(1)).unwrap();
    open.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    open.send(()).unwrap();
    assert!(long.wait().await.is_ok());
    until(|| idles.load(Ordering::Relaxed) == 1).await;
    assert_eq!(idles.load(Ordering::Relaxed), 1, "only the long batch");
}

/// A waiting job's ticket tells how many are ahead of it; once it runs, its steps.
#[tokio::test]
async fn progress_tells_the_place_in_line_then_the_steps() {
    let (q, open, _) = queue(4, Duration::from_secs(60));
    let first = q.submit(req(3)).unwrap();
    until(|| q.running() == 1).await;
    let second = q.submit(req(2)).unwrap();
    let third = q.submit(req(2)).unwrap();
    let (mut watch, third_watch) = (second.progress().unwrap(), third.progress().unwrap());
    assert_eq!((watch.now().running, watch.now().ahead), (false, Some(0)));
    assert_eq!(
        third_watch.now().ahead,
        Some(1),
        "the second job is ahead of the third"
    );
    let first_watch = first.progress().unwrap();
    open.send(()).unwrap();
    until(|| first_watch.now().step == 0 && first_watch.now().running).await;
    // Through the first job's other three steps: the second starts, then reports each.
    for _ in 0..3 {
        open.send(()).unwrap();
    }
    assert!(first.wait().await.is_ok());
    until(|| watch.now().running).await;
    assert_eq!(third_watch.now().ahead, Some(0));
    let mut seen = vec![watch.now().step];
    for _ in 0..3 {
        open.send(()).unwrap();
        assert!(watch.changed().await);
        seen.push(watch.now().step);
    }
    assert_eq!((seen.last(), watch.now().total), (Some(&2), 2), "{seen:?}");
    assert!(second.wait().await.is_ok());
    for _ in 0..3 {
        open.send(()).unwrap();
    }
    assert!(third.wait().await.is_ok());
}
