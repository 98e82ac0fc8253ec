//! `GET /`: the playground page and its two files, compiled in, served without a key
//! (the page asks for one), with a content security policy; off when configured so.

use crate::common::*;

#[tokio::test]
async fn the_page_and_its_files_are_served_and_can_be_turned_off() {
    let s = start(Options::default()).await;
    for (path, kind, holds) in [
        ("/", "text/html", "Pictor <span>playground</span>"),
        (
            "/playground/app.js",
            "text/javascript",
            "/v1/images/generations",
        ),
        ("/playground/style.css", "text/css", "--accent"),
    ] {
        let r = s
            .client
            .get(format!("{}{path}", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'self'")
        );
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert!(r.text().await.unwrap().contains(holds), "{path}");
    }
    let missing = s
        .client
        .get(format!("{}/playground/secret.txt", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let off = start(Options {
        playground: false,
        load_model: false,
        ..Options::default()
    })
    .await;
    let r = off
        .client
        .get(format!("{}/", off.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("playground = false"),
        "{body}"
    );
}
