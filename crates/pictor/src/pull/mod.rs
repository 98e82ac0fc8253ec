//! `pictor models pull`: fetch a model from the Hugging Face Hub into the standard cache
//! (shared with diffusers and the other tools that read it), checked file by file, then
//! say how to serve it, or add it to the configuration. The server itself never downloads.

mod hub;
mod progress;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bytesize::ByteSize;

use crate::catalogue::{self, Role};
use hub::{Hub, Listing, RemoteFile};

/// Arguments of `pictor models pull`.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// A model known by name (`flux-1-schnell`, `flux-1-schnell:q4_k`, ...: see `--list`) or
    /// a Hugging Face repo id, `owner/name` or `owner/name@revision`.
    #[arg(required_unless_present = "list")]
    target: Option<String>,
    /// List the models known by name and exit.
    #[arg(long)]
    list: bool,
    /// Only files matching this pattern (`*` crosses folders), for a repo id; may repeat.
    /// Default: a diffusers folder's `model_index.json` and sub-folders, else every file.
    #[arg(long)]
    include: Vec<String>,
    /// Leave out files matching this pattern; may repeat.
    #[arg(long)]
    exclude: Vec<String>,
    /// The name to serve the model under (default: the catalogue name without its `:tag`,
    /// or the repository's name in lower case).
    #[arg(long = "as", value_name = "NAME")]
    name: Option<String>,
    /// Add the model to the configuration file (`--config`, else ./pictor.toml, created if
    /// missing) instead of printing the lines to add.
    #[arg(long, conflicts_with = "lora")]
    write_config: bool,
    /// The repository holds a LoRA: link its `.safetensors` file (the one `--include`
    /// picks when there are several) into the LoRA folder as NAME (`--as`, default the
    /// repository's name), where requests' `loras` find it.
    #[arg(long)]
    lora: bool,
}

/// One repository to take files from.
struct Wanted {
    repo: String,
    revision: String,
    include: Vec<String>,
    role: Role,
}

/// Runs `pictor models pull`.
pub fn run(args: PullArgs, config_file: Option<&Path>) -> anyhow::Result<()> {
    if args.list {
        for entry in catalogue::ENTRIES {
            println!("{:<22} {}", entry.name, entry.about);
        }
        println!(
            "\nOr any Hugging Face repo id: pictor models pull owner/name[@revision] [--include PATTERN]"
        );
        return Ok(());
    }
    let target = args.target.as_deref().unwrap_or_default();
    let (wanted, served) = plan(target, &args)?;
    let name = args.name.clone().unwrap_or(served);
    let cache = pictor_engine::hf_hub_cache_dir();
    let hub = Hub::from_env(&cache)?;

    // Every repository is listed before anything is fetched: a gated one, a wrong name or
    // a pattern matching nothing stops the pull before gigabytes move.
    let mut chosen: Vec<(&Wanted, Listing, Vec<RemoteFile>)> = Vec::new();
    for w in &wanted {
        let listing = hub.list(&w.repo, &w.revision)?;
        let files = select(&listing, &w.include, &args.exclude)?;
        chosen.push((w, listing, files));
    }
    let total: u64 = chosen.iter().flat_map(|(_, _, f)| f).map(|f| f.size).sum();
    // What is not in the cache yet, looked at once.
    let missing: Vec<(&Listing, &RemoteFile)> = chosen
        .iter()
        .flat_map(|(_, l, files)| {
            files
                .iter()
                .filter(|f| !hub.is_cached(l, f))
                .map(move |f| (l, f))
        })
        .collect();
    let needed = missing.iter().map(|(_, f)| f.size).sum::<u64>();
    let here = total - needed;
    check_room(&cache, needed)?;
    let count: usize = chosen.iter().map(|(_, _, f)| f.len()).sum();
    println!(
        "Pulling `{target}`: {count} files, {} ({} already here), into {}",
        ByteSize(total),
        ByteSize(here),
        cache.display()
    );
    let bars = progress::Bars::new(total, here);
    for (listing, file) in missing {
        let bar = bars.file(&file.name);
        let result = hub.download(listing, file, bar.clone());
        bar.done();
        result?;
        bars.println(&format!(
            "  {}/{} ({}) checked",
            listing.repo,
            file.name,
            ByteSize(file.size)
        ));
    }
    bars.finish();

    if args.lora {
        return link_lora(&hub, &chosen, &name, config_file);
    }
    let model_path = serving_path(&hub, &chosen, &name, config_file)?;
    let lines = config_lines(&name, &model_path)?;
    if args.write_config {
        let file = config_file.unwrap_or(Path::new("pictor.toml"));
        add_to_config(file, &name, &model_path)?;
        println!(
            "Added `{name}` to {}; restart `pictor serve` to serve it:\n\n{lines}",
            file.display()
        );
    } else {
        println!(
            "Pulled. To serve it as `{name}`, add these lines to pictor.toml (or run again with \
             --write-config) and restart `pictor serve`:\n\n{lines}"
        );
    }
    Ok(())
}

/// What to fetch for `target`, and the name to serve it under.
fn plan(target: &str, args: &PullArgs) -> anyhow::Result<(Vec<Wanted>, String)> {
    if let Some(entry) = catalogue::find(target) {
        if !args.include.is_empty() {
            bail!("--include is for repo ids; `{target}` already names its files");
        }
        let wanted = entry
            .sources
            .iter()
            .map(|s| Wanted {
                repo: s.repo.to_string(),
                revision: "main".into(),
                include: s.include.iter().map(|p| p.to_string()).collect(),
                role: s.role,
            })
            .collect();
        return Ok((wanted, entry.served_name().to_string()));
    }
    let (repo, revision) = target.split_once('@').unwrap_or((target, "main"));
    let valid = |s: &str| {
        !s.is_empty()
            && !s.starts_with(['.', '-'])
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let Some((owner, model)) = repo.split_once('/').filter(|(o, m)| valid(o) && valid(m)) else {
        let known: Vec<&str> = catalogue::ENTRIES.iter().map(|e| e.name).collect();
        let hint = catalogue::guess(target)
            .map(|e| format!(" Did you mean `{}`?", e.name))
            .unwrap_or_default();
        bail!(
            "`{target}` is neither a model Pictor knows by name ({}) nor a Hugging Face repo id \
             (owner/name[@revision]).{hint}",
            known.join(", ")
        );
    };
    if revision.is_empty() || revision.contains("..") {
        bail!("`{revision}` is not a revision: use a branch, tag or commit");
    }
    let wanted = Wanted {
        repo: format!("{owner}/{model}"),
        revision: revision.to_string(),
        include: args.include.clone(),
        role: Role::Folder,
    };
    Ok((vec![wanted], model.to_ascii_lowercase()))
}

/// The files of `listing` to fetch: those matching `include` (or the default rule) and
/// no `exclude`. A pattern that matches nothing is an error naming the files there are.
fn select(
    listing: &Listing,
    include: &[String],
    exclude: &[String],
) -> anyhow::Result<Vec<RemoteFile>> {
    let compile = |p: &String| glob::Pattern::new(p).with_context(|| format!("pattern `{p}`"));
    let include: Vec<glob::Pattern> = include.iter().map(compile).collect::<Result<_, _>>()?;
    let exclude: Vec<glob::Pattern> = exclude.iter().map(compile).collect::<Result<_, _>>()?;
    let names = || listing.files.iter().map(|f| f.name.as_str());
    for pattern in &include {
        if !names().any(|n| pattern.matches(n)) {
            let listed: Vec<&str> = names().take(30).collect();
            bail!(
                "{}@{}: no file matches `{pattern}`; it has: {}",
                listing.repo,
                listing.revision,
                listed.join(", ")
            );
        }
    }
    // A diffusers folder by default: its index and sub-folders, not the single-file
    // checkpoints, pictures and notes at the top that would double the download.
    let diffusers = names().any(|n| n == "model_index.json");
    let wanted = |name: &str| match include.is_empty() {
        false => include.iter().any(|p| p.matches(name)),
        true if diffusers => name == "model_index.json" || name.contains('/'),
        true => true,
    };
    let files: Vec<RemoteFile> = listing
        .files
        .iter()
        .filter(|f| wanted(&f.name) && !exclude.iter().any(|p| p.matches(&f.name)))
        .cloned()
        .collect();
    if files.is_empty() {
        bail!(
            "{}@{}: nothing to fetch after --exclude",
            listing.repo,
            listing.revision
        );
    }
    Ok(files)
}

/// What the configuration's `path` should say. One folder: its repo id, found in the cache
/// by `pictor serve`. A folder and a transformer from another repository: a folder under
/// `<data_dir>/models/<name>` linking the transformer file and the folder's other parts.
fn serving_path(
    hub: &Hub,
    chosen: &[(&Wanted, Listing, Vec<RemoteFile>)],
    name: &str,
    config_file: Option<&Path>,
) -> anyhow::Result<String> {
    let folder = chosen
        .iter()
        .find(|(w, _, _)| w.role == Role::Folder)
        .context("a pull names one model folder")?;
    let transformer = chosen.iter().find(|(w, _, _)| w.role == Role::Transformer);
    let Some((_, t_listing, t_files)) = transformer else {
        let (w, _, _) = folder;
        return Ok(match w.revision.as_str() {
            "main" => w.repo.clone(),
            rev => format!("{}@{rev}", w.repo),
        });
    };
    let [t_file] = t_files.as_slice() else {
        bail!(
            "{}: several transformer files match ({}); name one",
            t_listing.repo,
            t_files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let data_dir = crate::config::Config::load(config_file)?.data_dir;
    let dir = data_dir.join("models").join(name);
    link_folder(
        &dir,
        &hub.snapshot(&folder.1),
        &folder.2,
        &hub.snapshot(t_listing).join(&t_file.name),
    )?;
    Ok(dir.display().to_string())
}

/// Links the pulled LoRA file into the LoRA folder as `name.safetensors`.
fn link_lora(
    hub: &Hub,
    chosen: &[(&Wanted, Listing, Vec<RemoteFile>)],
    name: &str,
    config_file: Option<&Path>,
) -> anyhow::Result<()> {
    if let Some(problem) = pictor_core::lora_name_problem(name) {
        bail!("{problem}; pick another with --as NAME");
    }
    let [(_, listing, files)] = chosen else {
        bail!("--lora takes a repository id, not a model Pictor knows by name");
    };
    let weights: Vec<&RemoteFile> = files
        .iter()
        .filter(|f| f.name.ends_with(".safetensors"))
        .collect();
    let [file] = weights.as_slice() else {
        bail!(
            "{}: {} .safetensors files ({}); pick the LoRA with --include",
            listing.repo,
            weights.len(),
            weights
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let dir = crate::config::Config::load(config_file)?.lora_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let link = dir.join(format!("{name}.{}", pictor_core::LORA_EXTENSION));
    if link.exists() && !link.is_symlink() {
        bail!(
            "{} exists and is not a link this command made; pull with --as OTHER",
            link.display()
        );
    }
    let _ = std::fs::remove_file(&link);
    let target = hub.snapshot(listing).join(&file.name);
    std::os::unix::fs::symlink(&target, &link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    println!(
        "LoRA `{name}` is in {}: requests add it with \"loras\": [{{\"name\": \"{name}\", \"scale\": 1.0}}] \
         (no restart needed)",
        dir.display()
    );
    Ok(())
}

/// Makes `dir` a model folder of links: each top-level entry the folder's files live in,
/// and the transformer file. Links already there (a pull before) are replaced.
fn link_folder(
    dir: &Path,
    snapshot: &Path,
    files: &[RemoteFile],
    transformer: &Path,
) -> anyhow::Result<()> {
    if dir.exists() {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if !path.is_symlink() {
                bail!(
                    "{} holds {}, which this pull did not make; move it or pull with --as OTHER",
                    dir.display(),
                    path.display()
                );
            }
            std::fs::remove_file(&path)?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tops: Vec<&str> = files
        .iter()
        .map(|f| f.name.split('/').next().unwrap_or(&f.name))
        .collect();
    tops.sort_unstable();
    tops.dedup();
    let mut links: Vec<(PathBuf, PathBuf)> = tops
        .into_iter()
        .map(|top| (snapshot.join(top), dir.join(top)))
        .collect();
    let t_name = transformer.file_name().context("a transformer file name")?;
    links.push((transformer.to_path_buf(), dir.join(t_name)));
    for (target, link) in links {
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    }
    Ok(())
}

/// The configuration lines that serve `path` as `name`.
fn config_lines(name: &str, path: &str) -> anyhow::Result<String> {
    let mut doc = toml_edit::DocumentMut::new();
    add_model(&mut doc, name, path)?;
    Ok(doc.to_string())
}

fn add_model(doc: &mut toml_edit::DocumentMut, name: &str, path: &str) -> anyhow::Result<()> {
    let models = doc
        .entry("models")
        .or_insert_with(toml_edit::table)
        .as_table_mut()
        .context("`models` in the configuration is not a table")?;
    models.set_implicit(true);
    if models.contains_key(name) {
        bail!(
            "the configuration already has a model `{name}`: pull with --as OTHER_NAME, or edit it by hand"
        );
    }
    let mut table = toml_edit::Table::new();
    table.insert("path", toml_edit::value(path));
    models.insert(name, toml_edit::Item::Table(table));
    Ok(())
}

/// Adds the model to the configuration file, keeping what is there (comments included).
fn add_to_config(file: &Path, name: &str, path: &str) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", file.display()))?;
    add_model(&mut doc, name, path)?;
    std::fs::write(file, doc.to_string()).with_context(|| format!("writing {}", file.display()))
}

/// Refuses a pull the cache's disk cannot hold, before anything moves (a disk that cannot
/// say how much room it has is not in the way).
fn check_room(cache: &Path, needed: u64) -> anyhow::Result<()> {
    let Some(existing) = cache.ancestors().find(|p| p.exists()) else {
        return Ok(());
    };
    let Ok(free) = fs4::available_space(existing) else {
        return Ok(());
    };
    if needed > free {
        bail!(
            "The pull needs {} more and {} has {} free: make room, or point HF_HUB_CACHE \
             (or HF_HOME) at a larger disk",
            ByteSize(needed),
            cache.display(),
            ByteSize(free)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: &[&str]) -> Listing {
        Listing {
            repo: "o/r".into(),
            revision: "main".into(),
            commit: "c".into(),
            files: names
                .iter()
                .map(|n| RemoteFile {
                    name: n.to_string(),
                    size: 1,
                    sha256: None,
                    git_sha1: None,
                })
                .collect(),
        }
    }

    fn names(files: &[RemoteFile]) -> Vec<&str> {
        files.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn a_diffusers_repo_defaults_to_its_folders_and_patterns_cross_folders() {
        let l = listing(&[
            "README.md",
            "flux1-schnell.safetensors",
            "model_index.json",
            "vae/config.json",
            "transformer/a.safetensors",
        ]);
        let all = select(&l, &[], &[]).unwrap();
        assert_eq!(
            names(&all),
            [
                "model_index.json",
                "vae/config.json",
                "transformer/a.safetensors"
            ]
        );
        let some = select(&l, &["*.safetensors".into()], &["transformer/*".into()]).unwrap();
        assert_eq!(names(&some), ["flux1-schnell.safetensors"]);
        let err = select(&l, &["*.gguf".into()], &[]).unwrap_err().to_string();
        assert!(
            err.contains("no file matches `*.gguf`") && err.contains("README.md"),
            "{err}"
        );
        let plain = listing(&["a.gguf", "README.md"]);
        assert_eq!(
            names(&select(&plain, &[], &[]).unwrap()),
            ["a.gguf", "README.md"]
        );
    }

    #[test]
    fn config_lines_are_added_once_keeping_the_file() {
        assert_eq!(
            config_lines("flux-1-schnell", "black-forest-labs/FLUX.1-schnell").unwrap(),
            "[models.flux-1-schnell]\npath = \"black-forest-labs/FLUX.1-schnell\"\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pictor.toml");
        std::fs::write(&file, "# mine\nlisten = \"127.0.0.1:9000\"\n").unwrap();
        add_to_config(&file, "a:b", "x/y").unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("# mine\nlisten"), "{text}");
        assert!(text.contains("[models.\"a:b\"]\npath = \"x/y\""), "{text}");
        let again = add_to_config(&file, "a:b", "x/z").unwrap_err().to_string();
        assert!(again.contains("already has a model `a:b`"), "{again}");
    }
}
