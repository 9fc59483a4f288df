//! The testing and benchmarking switches: environment variables read once when a GPU context
//! is created. Each picks between launcher rules, so that one build can be timed or tested both
//! ways; none is needed in production, and unset they all mean the measured default.
//!
//! A variable that is set (and not blank) but not understood fails the create with
//! INVALID_ARGUMENT naming it and what it takes: a misspelt value must not quietly give the
//! default, or an A/B run would time the same rule twice.

use super::geometry::FINAL_CLUSTER_SIZES;
use crate::status::{Error, Result};

/// Which stage-1 top-k `select` runs (SIKV_TOPK): `single` = one CTA per row (the original
/// kernel); `multi` or unset = the multi-CTA path (histogram in the score kernel, multi-CTA
/// compaction, one-CTA finish). `multi:N` also caps the candidate slots per row at N (a testing
/// aid: small N sends rows down the on-device fallback to the one-CTA select).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkPath {
    Single,
    Multi { cand_cap: Option<u32> },
}

/// Where the fused select (score + stage-1 top-k in clusters) runs (SIKV_FUSED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedMode {
    /// Unset or `auto`: where its clusters fit and it was measured faster.
    Measured,
    /// `off`: never (the kernel chain everywhere).
    Off,
    /// `on`: wherever its clusters fit.
    Always,
}

/// Every switch, as read at create time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switches {
    /// SIKV_PDL (`0`/`off` to disable): programmatic dependent launch where the device has it.
    pub pdl: bool,
    pub topk: TopkPath,
    pub fused: FusedMode,
    /// SIKV_ATTEND_SPAN: the sparse attend's span on every call (covers the multi-tile splits at
    /// small sizes); None = workspace::attend_span.
    pub attend_span: Option<u32>,
    /// SIKV_KEPT_SPLIT: kept dense entries per kept split of the attend and the dense decode on
    /// every call (KEPT_SPLIT_SMALL..=ATTEND_SPLIT); None = workspace::kept_split_len.
    pub kept_split: Option<u32>,
    /// SIKV_COMPACT_BLOCKS: the top-k compaction's blocks per row on every call (1 makes each
    /// block take every tile of its row); None = workspace::compact_blocks.
    pub compact_blocks: Option<u32>,
    /// SIKV_FINAL_CLUSTER: the CTAs (1, 2 or 4) that share a row of the stage-1 final select on
    /// every call where the device runs clusters; None = workspace::final_cluster_size's rule.
    pub final_cluster: Option<u32>,
    /// SIKV_SCORE_WIDE (`on`/`off`): every one-row score call takes, or none takes, the score
    /// with each thread's rows in flight at once; None = workspace::score_wide's rule.
    pub score_wide: Option<bool>,
    /// SIKV_HIST_ZERO=memset: the rows' histograms zeroed by a memset on the stream instead of
    /// the hist_zero kernel (`kernel`, the default).
    pub hist_zero_memset: bool,
    /// SIKV_DENSE_MIN_CHUNK: attend_dense's floor on a chunk's positions at every batch; None =
    /// workspace::dense_min_chunk's rule.
    pub dense_min_chunk: Option<usize>,
    /// SIKV_ROUTE_FORK (`off` to disable): the routed decode's two paths as parallel branches of
    /// a captured graph.
    pub route_fork: bool,
    /// SIKV_FORCE_NVRTC=1: skip the embedded fatbin and compile the sources (the fallback path).
    pub force_nvrtc: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            pdl: true,
            topk: TopkPath::Multi { cand_cap: None },
            fused: FusedMode::Measured,
            attend_span: None,
            kept_split: None,
            compact_blocks: None,
            final_cluster: None,
            score_wide: None,
            hist_zero_memset: false,
            dense_min_chunk: None,
            route_fork: true,
            force_nvrtc: false,
        }
    }
}

impl Switches {
    /// The switches of this process's environment.
    pub fn from_env() -> Result<Switches> {
        Switches::parse(|name| std::env::var(name).ok())
    }

    /// The switches that `get` (a variable's value, None when unset) describes.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Switches> {
        let var = |name: &'static str| Var {
            name,
            value: get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()),
        };
        let d = Switches::default();
        let topk = var("SIKV_TOPK");
        let cap = topk.value.as_deref().and_then(|v| v.strip_prefix("multi:"));
        let topk = match cap.map(str::parse::<u32>) {
            Some(Ok(n)) if n > 0 => TopkPath::Multi { cand_cap: Some(n) },
            Some(_) => return Err(topk.not_understood("single, multi or multi:N with N > 0")),
            None => topk
                .word(&[
                    ("multi", TopkPath::Multi { cand_cap: None }),
                    ("single", TopkPath::Single),
                ])?
                .unwrap_or(d.topk),
        };
        let fused = [
            ("auto", FusedMode::Measured),
            ("on", FusedMode::Always),
            ("off", FusedMode::Off),
        ];
        let hist_zero = [("kernel", false), ("memset", true)];
        Ok(Switches {
            pdl: var("SIKV_PDL").word(&ON_OFF)?.unwrap_or(d.pdl),
            topk,
            fused: var("SIKV_FUSED").word(&fused)?.unwrap_or(d.fused),
            attend_span: var("SIKV_ATTEND_SPAN").positive()?,
            kept_split: var("SIKV_KEPT_SPLIT").positive()?,
            compact_blocks: var("SIKV_COMPACT_BLOCKS").positive()?,
            final_cluster: var("SIKV_FINAL_CLUSTER").one_of(&FINAL_CLUSTER_SIZES)?,
            score_wide: var("SIKV_SCORE_WIDE").word(&ON_OFF)?,
            hist_zero_memset: var("SIKV_HIST_ZERO").word(&hist_zero)?.unwrap_or(d.hist_zero_memset),
            dense_min_chunk: var("SIKV_DENSE_MIN_CHUNK").positive()?,
            route_fork: var("SIKV_ROUTE_FORK").word(&ON_OFF)?.unwrap_or(d.route_fork),
            force_nvrtc: var("SIKV_FORCE_NVRTC").word(&ON_OFF)?.unwrap_or(d.force_nvrtc),
        })
    }
}

/// The values of an on/off switch.
const ON_OFF: [(&str, bool); 4] = [("1", true), ("on", true), ("0", false), ("off", false)];

/// One switch as set: its value trimmed, None when unset or blank.
struct Var {
    name: &'static str,
    value: Option<String>,
}

impl Var {
    fn not_understood(&self, takes: &str) -> Error {
        let value = self.value.as_deref().unwrap_or_default();
        Error::invalid(format!(
            "environment variable {}={value:?} is not understood: it takes {takes} (unset it for the default)",
            self.name
        ))
    }

    /// A switch that takes one of `words`.
    fn word<T: Copy>(&self, words: &[(&str, T)]) -> Result<Option<T>> {
        let Some(v) = self.value.as_deref() else {
            return Ok(None);
        };
        match words.iter().find(|(w, _)| *w == v) {
            Some((_, t)) => Ok(Some(*t)),
            None => Err(self.not_understood(&words.iter().map(|(w, _)| *w).collect::<Vec<_>>().join(", "))),
        }
    }

    /// A switch that takes one of `values`.
    fn one_of(&self, values: &[u32]) -> Result<Option<u32>> {
        let Some(v) = self.value.as_deref() else {
            return Ok(None);
        };
        match v.parse::<u32>() {
            Ok(n) if values.contains(&n) => Ok(Some(n)),
            _ => Err(self.not_understood(&values.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))),
        }
    }

    /// A switch that takes a positive integer.
    fn positive<T: std::str::FromStr + Default + PartialOrd>(&self) -> Result<Option<T>> {
        let Some(v) = self.value.as_deref() else {
            return Ok(None);
        };
        match v.parse::<T>() {
            Ok(n) if n > T::default() => Ok(Some(n)),
            _ => Err(self.not_understood("a positive integer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::SikvStatus;

    fn parse(vars: &[(&str, &str)]) -> Result<Switches> {
        Switches::parse(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn unset_and_blank_give_the_defaults() {
        assert_eq!(parse(&[]).unwrap(), Switches::default());
        let blank = [
            "SIKV_PDL",
            "SIKV_TOPK",
            "SIKV_FUSED",
            "SIKV_ATTEND_SPAN",
            "SIKV_KEPT_SPLIT",
            "SIKV_COMPACT_BLOCKS",
            "SIKV_FINAL_CLUSTER",
            "SIKV_SCORE_WIDE",
            "SIKV_HIST_ZERO",
            "SIKV_DENSE_MIN_CHUNK",
            "SIKV_ROUTE_FORK",
            "SIKV_FORCE_NVRTC",
        ];
        let vars: Vec<(&str, &str)> = blank.iter().map(|n| (*n, "  ")).collect();
        assert_eq!(parse(&vars).unwrap(), Switches::default());
        let d = Switches::default();
        assert!(d.pdl && d.route_fork && !d.force_nvrtc && !d.hist_zero_memset);
        assert_eq!(d.topk, TopkPath::Multi { cand_cap: None });
        assert_eq!(d.fused, FusedMode::Measured);
    }

    #[test]
    fn every_documented_value_is_read() {
        let s = parse(&[
            ("SIKV_PDL", "0"),
            ("SIKV_TOPK", " multi:64 "),
            ("SIKV_FUSED", "on"),
            ("SIKV_ATTEND_SPAN", "3"),
            ("SIKV_KEPT_SPLIT", "16"),
            ("SIKV_COMPACT_BLOCKS", "1"),
            ("SIKV_FINAL_CLUSTER", "4"),
            ("SIKV_SCORE_WIDE", "off"),
            ("SIKV_HIST_ZERO", "memset"),
            ("SIKV_DENSE_MIN_CHUNK", "1024"),
            ("SIKV_ROUTE_FORK", "off"),
            ("SIKV_FORCE_NVRTC", "1"),
        ])
        .unwrap();
        let want = Switches {
            pdl: false,
            topk: TopkPath::Multi { cand_cap: Some(64) },
            fused: FusedMode::Always,
            attend_span: Some(3),
            kept_split: Some(16),
            compact_blocks: Some(1),
            final_cluster: Some(4),
            score_wide: Some(false),
            hist_zero_memset: true,
            dense_min_chunk: Some(1024),
            route_fork: false,
            force_nvrtc: true,
        };
        assert_eq!(s, want);
        assert_eq!(parse(&[("SIKV_TOPK", "single")]).unwrap().topk, TopkPath::Single);
        assert_eq!(parse(&[("SIKV_FUSED", "off")]).unwrap().fused, FusedMode::Off);
        assert_eq!(parse(&[("SIKV_FUSED", "auto")]).unwrap().fused, FusedMode::Measured);
        assert!(parse(&[("SIKV_PDL", "on")]).unwrap().pdl);
        assert!(!parse(&[("SIKV_HIST_ZERO", "kernel")]).unwrap().hist_zero_memset);
        assert_eq!(parse(&[("SIKV_SCORE_WIDE", "1")]).unwrap().score_wide, Some(true));
    }

    /// SIKV_FINAL_CLUSTER takes every size the final select has an entry for, and no other.
    #[test]
    fn the_final_cluster_switch_takes_the_entries_sizes() {
        for c in FINAL_CLUSTER_SIZES {
            let s = parse(&[("SIKV_FINAL_CLUSTER", &c.to_string())]).unwrap();
            assert_eq!(s.final_cluster, Some(c));
        }
        for bad in ["0", "3", "8", "x"] {
            let e = parse(&[("SIKV_FINAL_CLUSTER", bad)]).expect_err(bad);
            assert!(e.message.contains("1, 2, 4"), "{}", e.message);
        }
    }

    #[test]
    fn a_value_not_understood_fails_naming_the_variable() {
        let bad = [
            ("SIKV_PDL", "no"),
            ("SIKV_TOPK", "multi:0"),
            ("SIKV_TOPK", "multi:x"),
            ("SIKV_TOPK", "singel"),
            ("SIKV_FUSED", "of"),
            ("SIKV_ATTEND_SPAN", "0"),
            ("SIKV_ATTEND_SPAN", "-2"),
            ("SIKV_COMPACT_BLOCKS", "four"),
            ("SIKV_FINAL_CLUSTER", "3"),
            ("SIKV_SCORE_WIDE", "wide"),
            ("SIKV_HIST_ZERO", "mem"),
            ("SIKV_DENSE_MIN_CHUNK", "1.5"),
            ("SIKV_ROUTE_FORK", "false"),
            ("SIKV_FORCE_NVRTC", "yes"),
        ];
        for (name, value) in bad {
            let e = parse(&[(name, value)]).expect_err(name);
            assert_eq!(e.status, SikvStatus::SIKV_ERR_INVALID_ARGUMENT, "{name}={value}");
            assert!(e.message.contains(name) && e.message.contains(value), "{}", e.message);
        }
    }
}
