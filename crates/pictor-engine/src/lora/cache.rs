//! Parsed LoRA files kept in memory by content hash, least recently used out first,
//! within a byte bound.

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::SystemTime,
};

use super::file::LoraFile;

/// Parsed files by SHA-256, least recently used first out; and each path's hash while its
/// size and modification time stay the same (so a file is hashed once).
#[derive(Default)]
pub(super) struct Cache {
    pub hashes: HashMap<PathBuf, (u64, Option<SystemTime>, String)>,
    pub files: HashMap<String, Arc<LoraFile>>,
    order: VecDeque<String>,
    pub bytes: u64,
    bound: u64,
}

impl Cache {
    /// An empty cache keeping at most `bound` bytes.
    pub fn new(bound: u64) -> Self {
        Self {
            bound,
            ..Self::default()
        }
    }

    pub fn touch(&mut self, sha: &str) {
        if let Some(i) = self.order.iter().position(|s| s == sha) {
            let s = self.order.remove(i).unwrap_or_default();
            self.order.push_back(s);
        }
    }

    /// Keeps `file`, dropping the least recently used ones past the bound (a file larger
    /// than the bound is used but not kept).
    pub fn insert(&mut self, sha: String, file: Arc<LoraFile>) {
        if file.bytes > self.bound {
            return;
        }
        self.bytes += file.bytes;
        self.files.insert(sha.clone(), file);
        self.order.push_back(sha);
        while self.bytes > self.bound {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(f) = self.files.remove(&old) {
                self.bytes -= f.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn file(bytes: u64) -> Arc<LoraFile> {
        Arc::new(LoraFile {
            modules: BTreeMap::new(),
            bytes,
        })
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used_files_within_its_bound() {
        let mut cache = Cache::new(100);
        cache.insert("a".into(), file(40));
        cache.insert("b".into(), file(40));
        cache.touch("a");
        // "b" was used longest ago: it goes to make room.
        cache.insert("c".into(), file(40));
        let mut kept: Vec<&String> = cache.files.keys().collect();
        kept.sort();
        assert_eq!(kept, ["a", "c"]);
        assert_eq!(cache.bytes, 80);
        // A file larger than the bound is used but not kept.
        cache.insert("huge".into(), file(101));
        assert!(!cache.files.contains_key("huge") && cache.bytes == 80);
    }
}
