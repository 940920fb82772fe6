//! A strict reader of the OpenMetrics text format, as far as ctmigrate
//! writes it: what the tests (and an operator's script) use to check that
//! a scrape is well formed and to read its values.
//!
//! Checked: every line is a `# HELP`, `# TYPE` or `# UNIT` of a family, a
//! sample, or the final `# EOF` (nothing after it); a family is declared
//! once, with a known type, before its samples, which are contiguous; a
//! sample's name is its family's with a suffix its type allows; names and
//! labels are well formed, label values quoted with only `\\`, `\"` and
//! `\n` escaped, no label twice; values are numbers; counters are not
//! negative; a histogram's buckets rise in `le` to `+Inf`, their counts
//! never fall, and the `+Inf` bucket equals `_count`.

use std::collections::{BTreeMap, HashSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A metric family's declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyDecl {
    pub name: String,
    pub kind: String,
    pub help: Option<String>,
}

/// A whole scrape, checked.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub families: Vec<FamilyDecl>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample `name` whose labels include all of
    /// `labels`; None if there is none, or more than one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self
            .samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)));
        let first = found.next()?;
        found.next().is_none().then_some(first.value)
    }

    pub fn family(&self, name: &str) -> Option<&FamilyDecl> {
        self.families.iter().find(|f| f.name == name)
    }
}

/// Why a scrape is not well formed: the line (from 1) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ParseError {
    pub line: usize,
    pub what: String,
}

const KINDS: [&str; 8] = ["counter", "gauge", "histogram", "gaugehistogram", "summary", "info", "stateset", "unknown"];

fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_name(s) && !s.contains(':')
}

fn number(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if s.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) && !s.is_empty() => s.parse().ok(),
        _ => None,
    }
}

/// Parses `text`, checking it as the module says.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    let mut declared = HashSet::new();
    // The family whose samples are being read; families closed already.
    let mut current: Option<usize> = None;
    let mut closed = HashSet::new();
    let mut eof = false;
    let lines: Vec<&str> = text.strip_suffix('\n').ok_or(ParseError { line: 0, what: "the text does not end with a newline".into() })?.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let err = |what: String| ParseError { line: n, what };
        if eof {
            return Err(err("text after # EOF".into()));
        }
        if *line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (keyword, name, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
            if !is_name(name) {
                return Err(err(format!("bad metric name `{name}`")));
            }
            match keyword {
                "TYPE" => {
                    let kind = arg.ok_or_else(|| err("# TYPE without a type".into()))?;
                    if !KINDS.contains(&kind) {
                        return Err(err(format!("unknown type `{kind}`")));
                    }
                    if !declared.insert(name.to_string()) {
                        return Err(err(format!("family `{name}` declared twice")));
                    }
                    if let Some(c) = current.take() {
                        closed.insert(out.families[c].name.clone());
                    }
                    // A HELP may have come first.
                    match out.families.iter().position(|f| f.name == name) {
                        Some(at) => out.families[at].kind = kind.to_string(),
                        None => out.families.push(FamilyDecl { name: name.to_string(), kind: kind.to_string(), help: None }),
                    }
                    current = out.families.iter().position(|f| f.name == name);
                }
                "HELP" => {
                    let help = arg.unwrap_or("").to_string();
                    match out.families.iter_mut().find(|f| f.name == name) {
                        Some(f) if f.help.is_some() => return Err(err(format!("family `{name}` has two # HELP"))),
                        Some(f) => f.help = Some(help),
                        None => out.families.push(FamilyDecl { name: name.to_string(), kind: String::new(), help: Some(help) }),
                    }
                }
                "UNIT" => {}
                other => return Err(err(format!("unknown `# {other}` line"))),
            }
            continue;
        }
        let sample = parse_sample(line).map_err(err)?;
        let family = out
            .families
            .iter()
            .position(|f| !f.kind.is_empty() && suffixes(&f.kind).iter().any(|s| sample.name.strip_suffix(s) == Some(f.name.as_str())))
            .ok_or_else(|| err(format!("sample `{}` belongs to no declared family", sample.name)))?;
        if closed.contains(&out.families[family].name) || current != Some(family) {
            return Err(err(format!("sample `{}` is not with its family's other samples", sample.name)));
        }
        let kind = out.families[family].kind.as_str();
        if kind == "counter" && sample.name.ends_with("_total") && (sample.value.is_nan() || sample.value < 0.0) {
            return Err(err(format!("counter `{}` is {}", sample.name, sample.value)));
        }
        if sample.name.ends_with("_bucket") && matches!(kind, "histogram" | "gaugehistogram") {
            let le = sample.labels.get("le").ok_or_else(|| err(format!("bucket `{}` without `le`", sample.name)))?;
            number(le).ok_or_else(|| err(format!("bucket bound `{le}` is not a number")))?;
        }
        out.samples.push(sample);
    }
    if !eof {
        return Err(ParseError { line: lines.len(), what: "no # EOF at the end".into() });
    }
    check_histograms(&out)?;
    Ok(out)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or_else(|| format!("`{line}` is not a sample"))?;
    let name = &line[..name_end];
    if !is_name(name) {
        return Err(format!("bad sample name `{name}`"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut end = None;
        loop {
            // label name
            let start = match chars.peek() {
                Some((_, '}')) => {
                    end = chars.next().map(|(i, _)| i);
                    break;
                }
                Some((i, _)) => *i,
                None => break,
            };
            let mut eq = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(i);
                    break;
                }
            }
            let eq = eq.ok_or_else(|| "a label without `=`".to_string())?;
            let key = &inner[start..eq];
            if !is_label_name(key) {
                return Err(format!("bad label name `{key}`"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label `{key}`'s value is not quoted"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape `\\{}` in label `{key}`", other.unwrap_or(' '))),
                    },
                    '\n' => return Err("a newline in a label value".into()),
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("label `{key}`'s value is not closed"));
            }
            if labels.insert(key.to_string(), value).is_some() {
                return Err(format!("label `{key}` twice"));
            }
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => {
                    end = Some(i);
                    break;
                }
                _ => return Err("labels not separated by `,` or closed by `}`".into()),
            }
        }
        let end = end.ok_or_else(|| "labels not closed".to_string())?;
        rest = &inner[end + 1..];
    }
    let rest = rest.strip_prefix(' ').ok_or_else(|| format!("no space before `{name}`'s value"))?;
    let mut fields = rest.split(' ');
    let value = fields.next().unwrap_or("");
    let value = number(value).ok_or_else(|| format!("`{value}` is not a number"))?;
    if let Some(ts) = fields.next() {
        number(ts).filter(|t| t.is_finite()).ok_or_else(|| format!("bad timestamp `{ts}`"))?;
    }
    if fields.next().is_some() {
        return Err("more than a value and a timestamp after the labels".into());
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

/// One histogram series: its buckets (bound, count) in order, its count.
type HistogramSeries = (Vec<(f64, f64)>, Option<f64>);

fn check_histograms(e: &Exposition) -> Result<(), ParseError> {
    let bad = |what: String| ParseError { line: 0, what };
    for f in e.families.iter().filter(|f| f.kind == "histogram") {
        // Per label set without `le`: its buckets in order, its count.
        let mut series: BTreeMap<Vec<(String, String)>, HistogramSeries> = BTreeMap::new();
        let bucket = format!("{}_bucket", f.name);
        let count = format!("{}_count", f.name);
        for s in e.samples.iter() {
            let key = || s.labels.iter().filter(|(k, _)| *k != "le").map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>();
            if s.name == bucket {
                let le = number(&s.labels["le"]).expect("checked");
                series.entry(key()).or_default().0.push((le, s.value));
            } else if s.name == count {
                series.entry(key()).or_default().1 = Some(s.value);
            }
        }
        for (labels, (buckets, count)) in series {
            let last = buckets.last().ok_or_else(|| bad(format!("histogram {} {labels:?} has no buckets", f.name)))?;
            if last.0 != f64::INFINITY {
                return Err(bad(format!("histogram {} {labels:?} does not end with le=\"+Inf\"", f.name)));
            }
            if buckets.windows(2).any(|w| w[0].0.partial_cmp(&w[1].0) != Some(std::cmp::Ordering::Less) || w[1].1 < w[0].1) {
                return Err(bad(format!("histogram {} {labels:?}: bounds not rising or counts falling", f.name)));
            }
            if count != Some(last.1) {
                return Err(bad(format!("histogram {} {labels:?}: _count {count:?} is not the +Inf bucket's {}", f.name, last.1)));
            }
        }
    }
    Ok(())
}
