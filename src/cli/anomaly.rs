//! `picket anomaly score`: fit an anomaly model on a CSV file and print one score per row.
//!
//! This is the only IO around [`crate::anomaly`]: it reads CSV files (header row, numeric
//! feature columns, an optional `label` column that is ignored), fits, and prints scores with
//! full precision (shortest representation that parses back to the same `f64`), one per line,
//! higher = more anomalous.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};

use crate::anomaly::{Ecod, EcodAggregation, EcodParams, IForestParams, IsolationForest, Matrix};

/// Which model `picket anomaly score` fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Algorithm {
    /// Isolation Forest (scikit-learn semantics); scores in (0, 1].
    Iforest,
    /// ECOD (PyOD semantics by default, see `--ecod-aggregation`).
    Ecod,
    /// COPOD (PyOD semantics).
    Copod,
}

/// How ECOD combines per-feature tail scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Aggregation {
    /// PyOD's shipped form: sum over features of the per-feature maximum.
    Pyod,
    /// The paper's form: maximum over the three per-family sums.
    Paper,
}

/// Arguments of `picket anomaly score`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    /// Model to fit.
    #[arg(long, value_enum, env = "PICKET_ANOMALY_ALGORITHM")]
    pub algorithm: Algorithm,
    /// Seed for Isolation Forest (same seed, same scores).
    #[arg(long, default_value_t = 0, env = "PICKET_ANOMALY_SEED")]
    pub seed: u64,
    /// Number of Isolation Forest trees.
    #[arg(long, default_value_t = 100, env = "PICKET_ANOMALY_TREES")]
    pub trees: usize,
    /// Rows per Isolation Forest tree (default min(256, training rows)).
    #[arg(long, env = "PICKET_ANOMALY_SAMPLE_SIZE")]
    pub sample_size: Option<usize>,
    /// ECOD aggregation (ignored by the other algorithms).
    #[arg(long, value_enum, default_value_t = Aggregation::Pyod, env = "PICKET_ANOMALY_ECOD_AGGREGATION")]
    pub ecod_aggregation: Aggregation,
    /// Training CSV: header row, numeric feature columns, optional `label` column (ignored).
    #[arg(long, env = "PICKET_ANOMALY_TRAIN")]
    pub train: PathBuf,
    /// CSV of rows to score, each on its own (streaming form), with the same feature columns as
    /// `--train`. Without it the training rows are scored (ECOD: PyOD's training scores).
    #[arg(long, env = "PICKET_ANOMALY_SCORE")]
    pub score: Option<PathBuf>,
}

/// Stand-alone parser so the command can be run from any argv (tests, examples).
#[derive(Debug, Parser)]
#[command(name = "picket-anomaly-score")]
struct Standalone {
    #[command(flatten)]
    args: ScoreArgs,
}

/// Parses `argv` (program name first) as [`ScoreArgs`] and runs the command, printing to stdout.
pub fn main_from_args<I, T>(argv: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let parsed = Standalone::try_parse_from(argv)?;
    run(&parsed.args)
}

/// Runs `picket anomaly score`, printing scores to stdout.
pub fn run(args: &ScoreArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    run_to(args, &mut out)?;
    out.flush().context("failed to write scores")?;
    Ok(())
}

/// Runs the command, writing one score per line to `out`.
pub fn run_to(args: &ScoreArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let train = read_csv(&args.train)?;
    let to_score = args.score.as_deref().map(read_csv).transpose()?;
    if let Some(s) = &to_score
        && s.names != train.names
    {
        bail!(
            "{}: feature columns {:?} do not match the training columns {:?} from {}",
            s.path.display(),
            s.names,
            train.names,
            train.path.display()
        );
    }
    let scores = match args.algorithm {
        Algorithm::Iforest => {
            let params = IForestParams {
                n_trees: args.trees,
                sample_size: args.sample_size,
                seed: args.seed,
                contamination: None,
            };
            match &to_score {
                Some(s) => {
                    let model = IsolationForest::fit(&train.x, &params)
                        .context("failed to fit the isolation forest")?;
                    s.x.rows()
                        .map(|row| model.score_one(row))
                        .collect::<Result<Vec<_>, _>>()?
                }
                None => {
                    IsolationForest::fit_with_training_scores(&train.x, &params)
                        .context("failed to fit the isolation forest")?
                        .1
                }
            }
        }
        Algorithm::Ecod | Algorithm::Copod => {
            let aggregation = match (args.algorithm, args.ecod_aggregation) {
                (Algorithm::Copod, _) => EcodAggregation::Copod,
                (_, Aggregation::Paper) => EcodAggregation::Paper,
                _ => EcodAggregation::Pyod,
            };
            let params = EcodParams {
                aggregation,
                ..EcodParams::default()
            };
            let (model, train_scores) =
                Ecod::fit_with_training_scores(&train.x, &params).context("failed to fit ECOD")?;
            match &to_score {
                Some(s) => {
                    s.x.rows()
                        .map(|row| model.score_one(row))
                        .collect::<Result<Vec<_>, _>>()?
                }
                None => train_scores,
            }
        }
    };
    for s in scores {
        writeln!(out, "{s}").context("failed to write scores")?;
    }
    Ok(())
}

/// A parsed CSV file.
struct Table {
    /// Where it came from, for messages.
    path: PathBuf,
    /// Feature column names (without `label`).
    names: Vec<String>,
    /// Feature values.
    x: Matrix,
}

/// Reads a numeric CSV with a header row; a column named `label` is dropped.
fn read_csv(path: &Path) -> anyhow::Result<Table> {
    let text =
        fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    parse_csv(path, &text)
}

fn clean(field: &str) -> &str {
    let f = field.trim();
    f.strip_prefix('"')
        .and_then(|f| f.strip_suffix('"'))
        .unwrap_or(f)
        .trim()
}

fn parse_csv(path: &Path, text: &str) -> anyhow::Result<Table> {
    let p = path.display();
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        bail!("{p}: file is empty (expected a header row)");
    };
    let header: Vec<&str> = header.split(',').map(clean).collect();
    let label = header.iter().position(|h| h.eq_ignore_ascii_case("label"));
    let names: Vec<String> = header
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != label)
        .map(|(_, h)| h.to_string())
        .collect();
    if names.is_empty() {
        bail!("{p}: no feature columns in the header");
    }
    let mut values = Vec::new();
    for (idx, line) in lines {
        let line_no = idx + 1;
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != header.len() {
            bail!(
                "{p}: line {line_no}: expected {} fields (as in the header), found {}",
                header.len(),
                fields.len()
            );
        }
        for (col, field) in fields.iter().enumerate() {
            if Some(col) == label {
                continue;
            }
            let field = clean(field);
            let v: f64 = field.parse().with_context(|| {
                format!(
                    "{p}: line {line_no}, column {col} (`{}`): cannot parse `{field}` as a number",
                    header[col]
                )
            })?;
            if !v.is_finite() {
                let kind = if v.is_nan() { "NaN" } else { "infinite" };
                bail!(
                    "{p}: line {line_no}, column {col} (`{}`): value is {kind}; impute or drop \
                     missing values before scoring",
                    header[col]
                );
            }
            values.push(v);
        }
    }
    if values.is_empty() {
        bail!("{p}: no data rows after the header");
    }
    let x = Matrix::with_names(values, names.len(), Some(&names))
        .with_context(|| format!("{p}: invalid data"))?;
    Ok(Table {
        path: path.to_path_buf(),
        names,
        x,
    })
}
