//! The queue's statements and the objects' paths against a real PostgreSQL (started by
//! `scripts/services`), one fresh database per test.

use std::time::Duration;

use pictor_core::RgbImage;
use pictor_store::Blobs;
use sqlx::PgPool;

use crate::{
    Cluster,
    jobs::{self, NewJob},
    objects::{self, INLINE_MAX, JobResult},
};

async fn pool() -> (String, PgPool) {
    let url = pictor_store::testing::fresh_postgres_url()
        .await
        .expect("a test database");
    let pool = PgPool::connect(&url).await.expect("PostgreSQL");
    (url, pool)
}

fn job<'a>(id: &'a str, images: i64) -> NewJob<'a> {
    NewJob {
        id,
        model: "m",
        request: "{}",
        images,
        max_attempts: 2,
        timeout_ms: 60_000,
    }
}

#[tokio::test]
async fn admission_is_bounded_by_the_waiting_jobs() {
    let (_, pool) = pool().await;
    for id in ["a", "b"] {
        let admitted = jobs::admit(&pool, &job(id, 1), 2).await.expect("admit");
        assert!(admitted.queued, "{id} is under the bound");
    }
    let refused = jobs::admit(&pool, &job("c", 1), 2).await.expect("admit");
    assert!(!refused.queued);
    assert_eq!((refused.waiting, refused.running), (2, 0));
    assert!(jobs::read(&pool, "c").await.expect("read").is_none());
    // Another model's queue is its own.
    let other = NewJob {
        model: "other",
        ..job("d", 1)
    };
    assert!(jobs::admit(&pool, &other, 2).await.expect("admit").queued);
    // A running job no longer counts as waiting.
    let m = ["m".to_string()];
    let claimed = jobs::claim(&pool, "w", &m, &[i64::MAX], 10_000).await;
    assert_eq!(claimed.expect("claim").expect("a job").id, "a");
    let admitted = jobs::admit(&pool, &job("c", 1), 2).await.expect("admit");
    assert!(admitted.queued);
    assert_eq!((admitted.waiting, admitted.running), (1, 1));
}

#[tokio::test]
async fn a_waiting_job_knows_how_many_of_its_model_wait_before_it() {
    let (_, pool) = pool().await;
    // Admitted within the same millisecond or not: the order claims take is the order told.
    for id in ["a", "b", "c"] {
        jobs::admit(&pool, &job(id, 1), 10).await.expect("admit");
    }
    let other = NewJob {
        model: "other",
        ..job("o", 1)
    };
    jobs::admit(&pool, &other, 10).await.expect("admit");
    let place = |id: &'static str| {
        let pool = pool.clone();
        async move { jobs::place(&pool, id).await.expect("place") }
    };
    assert_eq!(
        (place("a").await, place("b").await, place("c").await),
        (Some(0), Some(1), Some(2))
    );
    assert_eq!(place("o").await, Some(0), "another model's line is its own");
    let m = ["m".to_string()];
    let claimed = jobs::claim(&pool, "w", &m, &[i64::MAX], 10_000).await;
    assert_eq!(claimed.expect("claim").map(|j| j.id), Some("a".into()));
    assert_eq!(place("a").await, None, "a running job waits no more");
    assert_eq!(place("c").await, Some(1));
    jobs::cancel(&pool, "b").await.expect("cancel");
    assert_eq!(place("c").await, Some(0), "a cancelled job leaves the line");
    assert_eq!(place("nobody").await, None);
}

#[tokio::test]
async fn a_claim_takes_only_a_job_that_fits_the_room() {
    let (_, pool) = pool().await;
    jobs::admit(&pool, &job("big", 4), 10).await.expect("admit");
    jobs::admit(&pool, &job("small", 1), 10)
        .await
        .expect("admit");
    let m = ["m".to_string()];
    let first = jobs::claim(&pool, "w", &m, &[2], 10_000)
        .await
        .expect("claim");
    assert_eq!(first.map(|j| (j.id, j.images)), Some(("small".into(), 1)));
    assert!(
        jobs::claim(&pool, "w", &m, &[3], 10_000)
            .await
            .expect("claim")
            .is_none(),
        "four images do not fit three"
    );
    let idle = jobs::claim(&pool, "w2", &m, &[i64::MAX], 10_000).await;
    assert_eq!(idle.expect("claim").map(|j| j.id), Some("big".into()));
    // A model the worker does not hold is never claimed.
    jobs::admit(
        &pool,
        &NewJob {
            model: "x",
            ..job("x1", 1)
        },
        10,
    )
    .await
    .expect("admit");
    let none = jobs::claim(&pool, "w", &m, &[i64::MAX], 10_000).await;
    assert!(none.expect("claim").is_none());
}

#[tokio::test]
async fn an_outcome_is_written_once_and_ended_jobs_are_found_and_swept() {
    let (_, pool) = pool().await;
    jobs::admit(&pool, &job("a", 1), 10).await.expect("admit");
    jobs::admit(&pool, &job("b", 1), 10).await.expect("admit");
    let m = ["m".to_string()];
    let a = jobs::claim(&pool, "w1", &m, &[i64::MAX], 10_000).await;
    assert_eq!(a.expect("claim").expect("a job").id, "a");
    // Only the worker holding the job ends it, and only once.
    let by_other = jobs::finish(&pool, "a", "w2", "done", Some("{}"), None).await;
    assert!(!by_other.expect("finish"));
    let first = jobs::finish(&pool, "a", "w1", "done", Some("{}"), None).await;
    assert!(first.expect("finish"));
    let again = jobs::finish(&pool, "a", "w1", "failed", None, Some("late")).await;
    assert!(!again.expect("finish"));
    let row = jobs::read(&pool, "a").await.expect("read").expect("a row");
    assert_eq!((row.state.as_str(), row.error), ("done", None));

    let ids = ["a", "b", "gone"].map(String::from);
    let mut ended = jobs::ended(&pool, &ids).await.expect("ended");
    ended.sort();
    assert_eq!(ended, ["a"], "b still waits, and no job is called gone");

    // Within the retention nothing goes; past it only ended jobs do.
    assert!(
        jobs::sweep(&pool, 60_000, 10)
            .await
            .expect("sweep")
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let swept = jobs::sweep(&pool, 10, 10).await.expect("sweep");
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].0, "a");
    assert!(jobs::read(&pool, "a").await.expect("read").is_none());
    assert!(jobs::read(&pool, "b").await.expect("read").is_some());
}

fn noise(side: usize) -> RgbImage {
    RgbImage {
        width: side,
        height: side,
        pixels: (0..side * side * 3).map(|_| rand::random::<u8>()).collect(),
    }
}

#[tokio::test]
async fn small_results_travel_in_the_row_and_large_ones_in_the_store() {
    let (url, _) = pool().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let blobs = Blobs::local(dir.path()).expect("a local store");
    let cluster = Cluster::connect_with(&url, blobs, "t", 2)
        .await
        .expect("cluster");
    let small = RgbImage {
        width: 64,
        height: 64,
        pixels: vec![7; 64 * 64 * 3],
    };
    // Noise does not compress: its PNG is past the bound.
    let large = noise(256);
    assert!(objects::png(&large).expect("png").len() > INLINE_MAX);
    let images = [small.clone(), large.clone()];
    let inline = objects::put_results(&cluster, "j", &images)
        .await
        .expect("put");
    assert!(inline[0].is_some() && inline[1].is_none());
    let result = JobResult {
        prompt: Default::default(),
        phases: Default::default(),
        device: String::new(),
        loras: Vec::new(),
        queued_ms: 0,
        ran_ms: 0,
        images: 2,
        inline,
    };
    for (i, want) in images.iter().enumerate() {
        let got = objects::get_result(&cluster, "j", &result, i)
            .await
            .expect("get");
        assert_eq!(&got, want, "image {i}");
    }
    // Only the large one is left to delete, and the sweep finds it from the row.
    let names = objects::all("j", 2, 0, false, Some(&result));
    assert_eq!(names, [objects::result("j", 1)]);
    let row = serde_json::to_string(&result).expect("json");
    let request = serde_json::to_string(&objects::JobRequest {
        request: pictor_core::GenerationRequest {
            n: 2,
            ..Default::default()
        },
        edit: None,
    })
    .expect("json");
    assert_eq!(objects::left_by("j", &request, Some(&row)), names);
    cluster.delete_objects(&names).await;
    assert!(
        objects::get_result(&cluster, "j", &result, 1)
            .await
            .is_err()
    );
}
