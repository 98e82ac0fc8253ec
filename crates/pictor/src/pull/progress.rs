//! Progress bars for `pictor models pull`: one for the file being fetched, one for the
//! whole pull, each with bytes, rate and time left. Hidden when stderr is not a terminal.

use hf_hub::api::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// The bars of one pull.
pub struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
}

impl Bars {
    /// Bars for a pull of `bytes` bytes, of which `done` are already in the cache.
    pub fn new(bytes: u64, done: u64) -> Self {
        let multi = MultiProgress::new();
        let total = multi.add(ProgressBar::new(bytes));
        total.set_style(style("total"));
        total.set_position(done);
        Self { multi, total }
    }

    /// The bar of one file; the pull's bar goes on from where it is.
    pub fn file(&self, name: &str) -> FileBar {
        let bar = self.multi.insert_before(&self.total, ProgressBar::new(0));
        bar.set_style(style(name));
        FileBar {
            bar,
            total: self.total.clone(),
            base: self.total.position(),
        }
    }

    /// Prints a line above the bars (or plainly, without a terminal).
    pub fn println(&self, line: &str) {
        if self.multi.is_hidden() {
            println!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }

    pub fn finish(&self) {
        self.total.finish_and_clear();
    }
}

fn style(label: &str) -> ProgressStyle {
    // The end of a long name says most (`...-00002-of-00003.safetensors`).
    let label: String = label.replace(['{', '}'], "");
    let chars: Vec<char> = label.chars().collect();
    let label: String = chars[chars.len().saturating_sub(32)..].iter().collect();
    ProgressStyle::with_template(&format!(
        "{label:>32} [{{wide_bar}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} ({{eta}} left)"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// One file's bar; hf-hub reports into it (and so into the pull's bar).
#[derive(Clone)]
pub struct FileBar {
    bar: ProgressBar,
    total: ProgressBar,
    base: u64,
}

impl FileBar {
    pub fn done(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for FileBar {
    // hf-hub calls `init` again on every attempt, then `update` with the bytes resumed.
    fn init(&mut self, size: usize, _filename: &str) {
        self.bar.set_length(size as u64);
        self.bar.set_position(0);
        self.total.set_position(self.base);
    }

    fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
        self.total.inc(size as u64);
    }

    fn finish(&mut self) {}
}
