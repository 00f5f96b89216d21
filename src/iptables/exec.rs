//! Running `iptables-restore` / `iptables-save` (and the ip6tables twins),
//! with the legacy or nft backend.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::Error;

/// Which iptables implementation to drive (`--iptables-backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// The one already holding rules (as kube-proxy's iptables-wrapper
    /// decides), else whatever plain `iptables` is.
    #[default]
    Auto,
    /// `iptables-legacy-*`.
    Legacy,
    /// `iptables-nft-*`.
    Nft,
}

/// The commands of one backend and family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tool {
    /// `iptables-restore`-like command.
    pub restore: String,
    /// `iptables-save`-like command.
    pub save: String,
}

fn tool(v6: bool, variant: &str) -> Tool {
    let base = if v6 { "ip6tables" } else { "iptables" };
    let sep = if variant.is_empty() { "" } else { "-" };
    Tool {
        restore: format!("{base}{sep}{variant}-restore"),
        save: format!("{base}{sep}{variant}-save"),
    }
}

/// Whether `cmd` is on PATH.
pub fn exists(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(cmd).is_file()))
}

/// Counts rules (`-A` lines) in the output of `save`; 0 if it cannot run.
async fn count_rules(save: &str) -> usize {
    match Command::new(save).stderr(Stdio::null()).output().await {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count(),
        _ => 0,
    }
}

/// Picks the tool for a family: an explicit choice, or (auto) the backend
/// with more rules in place, falling back to plain `iptables-restore`.
pub async fn detect(choice: BackendChoice, v6: bool) -> Tool {
    let plain = tool(v6, "");
    match choice {
        BackendChoice::Legacy => tool(v6, "legacy"),
        BackendChoice::Nft => tool(v6, "nft"),
        BackendChoice::Auto => {
            let (legacy, nft) = (tool(v6, "legacy"), tool(v6, "nft"));
            if !exists(&legacy.save) || !exists(&nft.save) {
                return plain;
            }
            let (l, n) = tokio::join!(count_rules(&legacy.save), count_rules(&nft.save));
            if l > n {
                legacy
            } else if n > l {
                nft
            } else {
                plain
            }
        }
    }
}

impl Tool {
    /// `save -t nat`.
    pub async fn save_nat(&self) -> Result<String, Error> {
        self.save_table("nat").await
    }

    /// `save -t nat` then `save -t filter`: the tables we write.
    pub async fn save_ours(&self) -> Result<String, Error> {
        let mut out = String::new();
        for table in super::render::TABLES {
            out.push_str(&self.save_table(table).await?);
        }
        Ok(out)
    }

    /// `save -t TABLE`.
    pub async fn save_table(&self, table: &str) -> Result<String, Error> {
        let out = Command::new(&self.save)
            .args(["-t", table])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| Error::Spawn(self.save.clone(), e))?;
        if !out.status.success() {
            return Err(Error::Failed {
                command: self.save.clone(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                line: None,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `restore --noflush --wait` with `payload` on stdin: atomic.
    pub async fn restore(&self, payload: &str) -> Result<(), Error> {
        let mut child = Command::new(&self.restore)
            .args(["--noflush", "--wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Spawn(self.restore.clone(), e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(payload.as_bytes())
                .await
                .map_err(|e| Error::Spawn(self.restore.clone(), e))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| Error::Spawn(self.restore.clone(), e))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(Error::Failed {
            command: self.restore.clone(),
            line: failed_line(&stderr, payload),
            stderr,
        })
    }
}

/// The payload line that `iptables-restore` names: "line N failed"
/// (legacy) or "Error occurred at line: N" (nft).
fn failed_line(stderr: &str, payload: &str) -> Option<String> {
    let n: usize = stderr.match_indices("line").find_map(|(i, _)| {
        let rest = stderr[i + 4..].trim_start_matches([':', ' ']);
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })?;
    payload.lines().nth(n.checked_sub(1)?).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_failed_line() {
        let payload = "*nat\n:A - [0:0]\n-A A -j BOGUS\nCOMMIT\n";
        assert_eq!(
            failed_line("iptables-restore: line 3 failed", payload).as_deref(),
            Some("-A A -j BOGUS")
        );
        assert_eq!(
            failed_line(
                "Chain 'X' does not exist\nError occurred at line: 3\n",
                payload
            )
            .as_deref(),
            Some("-A A -j BOGUS")
        );
        assert_eq!(failed_line("something else", payload), None);
    }

    #[test]
    fn tool_names() {
        assert_eq!(tool(false, "nft").restore, "iptables-nft-restore");
        assert_eq!(tool(true, "").save, "ip6tables-save");
    }
}
