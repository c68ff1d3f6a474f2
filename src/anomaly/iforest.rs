//! Isolation Forest (Liu, Ting & Zhou, ICDM 2008) with scikit-learn 1.9.1's tree-growing rules.
//!
//! What is reproduced (SPEC.md section 1): ψ = min(256, n) rows per tree drawn without
//! replacement; height limit ceil(log2 ψ); at each node the split feature is uniform over the
//! features that are not constant on the node (max − min ≤ 1e-7 counts as constant, and a
//! constant feature never costs a level); threshold τ uniform in [min, max) (τ == max falls back
//! to min); `x ≤ τ` goes left; path length e + c(n_leaf) with c(2) = 1; normalised by c(ψ).
//! Random streams are our own (per-tree seed = hash(seed, tree index)), so results match
//! scikit-learn in distribution, not bit for bit.
//!
//! Trees live in one flat node array (children of a node are adjacent). A leaf points to itself
//! with threshold +∞, so scoring advances a block of rows one level at a time with no branches
//! on the node kind.

use std::collections::HashSet;

use crate::anomaly::error::{AnomalyError, AnomalyResult};
use crate::anomaly::explain::{FeatureContribution, sort_contributions};
use crate::anomaly::matrix::{Matrix, check_row};
use crate::anomaly::parallel::map_rows;
use crate::anomaly::rng::{Rng, tree_seed};
use crate::anomaly::sort::order_key;
use crate::anomaly::stats::{average_path_length, percentile};

/// scikit-learn's `FEATURE_THRESHOLD`: a feature whose range on a node is at most this is
/// treated as constant there.
const FEATURE_THRESHOLD: f64 = 1e-7;

/// Rows scored together per tree in the level-synchronous loop (fits L1 with the tree).
const BLOCK: usize = 128;

/// Rows of a block walked down a tree together by the compact-layout scorer.
const LANES: usize = 8;

/// Hyper-parameters of [`IsolationForest`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IForestParams {
    /// Number of trees t (default 100, as scikit-learn and PyOD).
    pub n_trees: usize,
    /// Rows per tree ψ; `None` means min(256, n). Values above n are clamped to n.
    pub sample_size: Option<usize>,
    /// Seed; tree i is grown from hash(seed, i), so the same seed always gives the same forest.
    pub seed: u64,
    /// Expected share of anomalies. `None` ("auto", scikit-learn's default) flags s > 0.5, the
    /// paper's rule, without scoring the training set; `Some(c)`, c in (0, 0.5], sets the
    /// threshold to the (1 − c) percentile of training scores, as PyOD does.
    pub contamination: Option<f64>,
}

impl Default for IForestParams {
    fn default() -> Self {
        Self {
            n_trees: 100,
            sample_size: None,
            seed: 0,
            contamination: None,
        }
    }
}

/// One node of the flat tree array. Internal: rows with `x[feature] <= split` go to `left`,
/// others to `left + 1`. Leaf: `left` is the node's own index and `split` is +∞.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Node {
    /// Split threshold τ (+∞ for a leaf).
    pub(crate) split: f64,
    /// Split feature (0 for a leaf).
    pub(crate) feature: u32,
    /// Index of the left child; the right child is `left + 1`. A leaf points to itself.
    pub(crate) left: u32,
}

/// A fitted Isolation Forest.
#[derive(Debug, Clone, PartialEq)]
pub struct IsolationForest {
    /// Number of features d the forest was fitted on.
    n_features: usize,
    /// Subsample size ψ actually used (sets the normaliser c(ψ)).
    sample_size: usize,
    /// Seed the forest was grown from (kept so a stored model says how it was made).
    seed: u64,
    /// All nodes of all trees.
    nodes: Vec<Node>,
    /// Training-subsample rows that reached each node (attribution and leaf corrections).
    n_samples: Vec<u32>,
    /// For leaves, the path length contribution e + c(n_leaf); 0 for internal nodes.
    leaf_value: Vec<f64>,
    /// Root index of each tree; `tree_start[t]..tree_start[t + 1]` are tree t's nodes.
    tree_start: Vec<u32>,
    /// Deepest leaf of each tree (levels the scoring loop must advance).
    tree_depth: Vec<u8>,
    /// Contamination the threshold came from (`None` = auto, threshold 0.5).
    contamination: Option<f64>,
    /// Score above which a row is flagged.
    threshold: f64,
    /// The same trees re-laid out as complete binary trees for fast batch scoring, when every
    /// tree is at most [`COMPACT_DEPTH`] deep (always true for ψ ≤ 256); derived, not stored.
    compact: Option<Vec<CompactTree>>,
}

/// Depth of the complete-tree layout used by [`CompactTree`].
const COMPACT_DEPTH: usize = 8;
/// Slots in a complete tree of depth [`COMPACT_DEPTH`] (heap index 1..256 internal, leaves
/// 256..512 stored separately).
const COMPACT_SLOTS: usize = 1 << COMPACT_DEPTH;

/// One tree as a complete binary tree in heap order: node i has children 2i and 2i + 1, so no
/// child pointers are loaded, and fixed-size arrays with masked indices need no bounds checks.
/// A leaf above the bottom level is padded with +∞ splits (always left) down to the bottom.
#[derive(Debug, Clone, PartialEq)]
struct CompactTree {
    /// Split threshold of heap node i as an [`order_key`] (index 0 unused; key of +∞ for
    /// padding, which no finite value exceeds).
    split: [u64; COMPACT_SLOTS],
    /// Split feature of heap node i.
    feature: [u32; COMPACT_SLOTS],
    /// Path length e + c(n_leaf) of bottom slot i (heap index COMPACT_SLOTS + i).
    leaf: [f64; COMPACT_SLOTS],
}

impl CompactTree {
    /// Lays out the tree rooted at `root` of `forest` with `depth` levels (≤ COMPACT_DEPTH).
    fn build(forest: &IsolationForest, root: usize, depth: usize) -> Self {
        let mut t = Self {
            split: [order_key(f64::INFINITY); COMPACT_SLOTS],
            feature: [0; COMPACT_SLOTS],
            leaf: [0.0; COMPACT_SLOTS],
        };
        t.fill(forest, root, 1, 0, depth);
        t
    }

    fn fill(
        &mut self,
        forest: &IsolationForest,
        node: usize,
        heap: usize,
        level: usize,
        depth: usize,
    ) {
        if level == depth {
            debug_assert_eq!(
                forest.nodes[node].left as usize, node,
                "bottom must be a leaf"
            );
            self.leaf[heap - (1 << depth)] = forest.leaf_value[node];
            return;
        }
        let n = forest.nodes[node];
        if n.left as usize == node {
            // Leaf above the bottom: +∞ split, always left, down to the bottom level.
            self.fill(forest, node, 2 * heap, level + 1, depth);
        } else {
            self.split[heap] = order_key(n.split);
            self.feature[heap] = n.feature;
            self.fill(forest, n.left as usize, 2 * heap, level + 1, depth);
            self.fill(forest, n.left as usize + 1, 2 * heap + 1, level + 1, depth);
        }
    }
}

/// Builder state for one tree.
struct TreeBuilder<'a> {
    /// Column-major copy of the subsample: `data[f * psi + i]`.
    data: &'a [f64],
    /// Subsample size.
    psi: usize,
    /// Height limit.
    max_depth: usize,
    /// The tree's random stream.
    rng: Rng,
    /// Output nodes of this tree (indices local to the tree).
    nodes: Vec<Node>,
    /// Output node sizes.
    n_samples: Vec<u32>,
    /// Output leaf values.
    leaf_value: Vec<f64>,
    /// Deepest leaf so far.
    depth: usize,
}

impl TreeBuilder<'_> {
    fn range(&self, f: usize, rows: &[u32]) -> (f64, f64) {
        let col = &self.data[f * self.psi..(f + 1) * self.psi];
        let mut lo = f64::INFINITY;
        let mut hi = f64::NEG_INFINITY;
        for &r in rows {
            let v = col[r as usize];
            lo = lo.min(v);
            hi = hi.max(v);
        }
        (lo, hi)
    }

    fn make_leaf(&mut self, id: usize, depth: usize, size: usize) {
        self.nodes[id] = Node {
            split: f64::INFINITY,
            feature: 0,
            left: id as u32,
        };
        self.leaf_value[id] = depth as f64 + average_path_length(size);
        self.depth = self.depth.max(depth);
    }

    /// Grows node `id` from `rows` at edge-depth `depth`; `candidates` are the features not
    /// known to be constant on this node.
    fn grow(&mut self, id: usize, rows: &mut [u32], depth: usize, mut candidates: Vec<u32>) {
        self.n_samples[id] = rows.len() as u32;
        if depth >= self.max_depth || rows.len() < 2 {
            self.make_leaf(id, depth, rows.len());
            return;
        }
        // Fisher–Yates draw without replacement until a non-constant feature turns up; features
        // found constant are dropped for the whole subtree.
        let mut chosen = None;
        while !candidates.is_empty() {
            let k = self.rng.below(candidates.len());
            let f = candidates[k] as usize;
            let (lo, hi) = self.range(f, rows);
            if hi <= lo + FEATURE_THRESHOLD {
                candidates.swap_remove(k);
                continue;
            }
            chosen = Some((f, lo, hi));
            break;
        }
        let Some((f, lo, hi)) = chosen else {
            self.make_leaf(id, depth, rows.len());
            return;
        };
        let mut split = lo + self.rng.next_f64() * (hi - lo);
        if split >= hi {
            split = lo;
        }
        debug_assert!(lo <= split && split < hi);
        let col = &self.data[f * self.psi..(f + 1) * self.psi];
        let mut n_left = 0;
        for i in 0..rows.len() {
            if col[rows[i] as usize] <= split {
                rows.swap(i, n_left);
                n_left += 1;
            }
        }
        debug_assert!(n_left > 0 && n_left < rows.len());
        let left = self.nodes.len();
        let empty = Node {
            split: f64::INFINITY,
            feature: 0,
            left: 0,
        };
        self.nodes.extend([empty, empty]);
        self.n_samples.extend([0, 0]);
        self.leaf_value.extend([0.0, 0.0]);
        self.nodes[id] = Node {
            split,
            feature: f as u32,
            left: left as u32,
        };
        let (l_rows, r_rows) = rows.split_at_mut(n_left);
        self.grow(left, l_rows, depth + 1, candidates.clone());
        self.grow(left + 1, r_rows, depth + 1, candidates);
    }
}

/// Height limit ceil(log2(max(ψ, 2))).
fn height_limit(psi: usize) -> usize {
    ((psi.max(2) - 1).ilog2() + 1) as usize
}

/// ψ distinct row indices out of n (Floyd's algorithm), in a deterministic order.
fn sample_rows(rng: &mut Rng, n: usize, psi: usize) -> Vec<usize> {
    if psi >= n {
        return (0..n).collect();
    }
    let mut seen = HashSet::with_capacity(psi * 2);
    let mut out = Vec::with_capacity(psi);
    for j in n - psi..n {
        let t = rng.below(j + 1);
        let pick = if seen.insert(t) { t } else { j };
        if pick == j {
            seen.insert(j);
        }
        out.push(pick);
    }
    out
}

impl IsolationForest {
    /// Grows the forest on `x`. With `contamination: Some(_)` the training rows are scored once
    /// to place the threshold.
    pub fn fit(x: &Matrix, params: &IForestParams) -> AnomalyResult<Self> {
        let mut forest = Self::grow(x, params)?;
        if let Some(c) = params.contamination {
            let scores = forest.score_batch(x)?;
            forest.threshold = percentile(&scores, 100.0 * (1.0 - c));
        }
        Ok(forest)
    }

    /// Grows the forest and returns the training rows' scores too (one extra scoring pass when
    /// contamination is auto).
    pub fn fit_with_training_scores(
        x: &Matrix,
        params: &IForestParams,
    ) -> AnomalyResult<(Self, Vec<f64>)> {
        let mut forest = Self::grow(x, params)?;
        let scores = forest.score_batch(x)?;
        if let Some(c) = params.contamination {
            forest.threshold = percentile(&scores, 100.0 * (1.0 - c));
        }
        Ok((forest, scores))
    }

    fn grow(x: &Matrix, params: &IForestParams) -> AnomalyResult<Self> {
        if params.n_trees == 0 {
            return Err(AnomalyError::InvalidParameter {
                name: "n_trees",
                reason: "must be at least 1".into(),
            });
        }
        if params.sample_size == Some(0) {
            return Err(AnomalyError::InvalidParameter {
                name: "sample_size",
                reason: "must be at least 1".into(),
            });
        }
        if let Some(c) = params.contamination
            && !(c > 0.0 && c <= 0.5)
        {
            return Err(AnomalyError::InvalidParameter {
                name: "contamination",
                reason: format!("must be in (0, 0.5], got {c}"),
            });
        }
        let (n, d) = (x.n_rows(), x.n_cols());
        if d > u32::MAX as usize {
            return Err(AnomalyError::InvalidParameter {
                name: "x",
                reason: "too many features".into(),
            });
        }
        let psi = params.sample_size.unwrap_or(256).min(n);
        let max_depth = height_limit(psi);
        let mut forest = Self {
            n_features: d,
            sample_size: psi,
            seed: params.seed,
            nodes: Vec::new(),
            n_samples: Vec::new(),
            leaf_value: Vec::new(),
            tree_start: Vec::with_capacity(params.n_trees + 1),
            tree_depth: Vec::with_capacity(params.n_trees),
            contamination: params.contamination,
            threshold: 0.5,
            compact: None,
        };
        let mut data = vec![0.0; psi * d];
        let mut rows: Vec<u32> = Vec::with_capacity(psi);
        let all_features: Vec<u32> = (0..d as u32).collect();
        for t in 0..params.n_trees {
            let mut rng = Rng::new(tree_seed(params.seed, t as u64));
            let sample = sample_rows(&mut rng, n, psi);
            for (i, &r) in sample.iter().enumerate() {
                for (f, &v) in x.row(r).iter().enumerate() {
                    data[f * psi + i] = v;
                }
            }
            rows.clear();
            rows.extend(0..psi as u32);
            let mut b = TreeBuilder {
                data: &data,
                psi,
                max_depth,
                rng,
                nodes: vec![Node {
                    split: f64::INFINITY,
                    feature: 0,
                    left: 0,
                }],
                n_samples: vec![0],
                leaf_value: vec![0.0],
                depth: 0,
            };
            b.grow(0, &mut rows, 0, all_features.clone());
            let base = forest.nodes.len() as u32;
            forest.tree_start.push(base);
            forest.tree_depth.push(b.depth as u8);
            forest.nodes.extend(b.nodes.iter().map(|node| Node {
                left: node.left + base,
                ..*node
            }));
            forest.n_samples.extend(b.n_samples);
            forest.leaf_value.extend(b.leaf_value);
        }
        forest.tree_start.push(forest.nodes.len() as u32);
        forest.compact = forest.build_compact();
        Ok(forest)
    }

    /// Normaliser c(ψ).
    fn normaliser(&self) -> f64 {
        average_path_length(self.sample_size)
    }

    /// Turns a sum of path lengths over all trees into s = 2^(−mean / c(ψ)).
    #[inline]
    fn to_score(&self, path_sum: f64) -> f64 {
        let c = self.normaliser();
        if c == 0.0 {
            return 1.0;
        }
        let s = (-(path_sum / self.n_trees() as f64) / c).exp2();
        debug_assert!(s > 0.0 && s <= 1.0);
        s
    }

    /// Scores one row: s ∈ (0, 1], higher = more anomalous.
    pub fn score_one(&self, row: &[f64]) -> AnomalyResult<f64> {
        check_row(row, self.n_features)?;
        let mut sum = 0.0;
        for t in 0..self.n_trees() {
            let mut i = self.tree_start[t] as usize;
            for _ in 0..self.tree_depth[t] {
                let node = self.nodes[i];
                i = node.left as usize + usize::from(row[node.feature as usize] > node.split);
            }
            sum += self.leaf_value[i];
        }
        Ok(self.to_score(sum))
    }

    /// Depth shared by all trees in the compact layout.
    fn compact_depth(&self) -> usize {
        self.tree_depth.iter().copied().max().unwrap_or(0) as usize
    }

    /// Builds the complete-tree layout when every tree fits it.
    fn build_compact(&self) -> Option<Vec<CompactTree>> {
        let depth = self.compact_depth();
        (depth <= COMPACT_DEPTH).then(|| {
            self.tree_start[..self.n_trees()]
                .iter()
                .map(|&root| CompactTree::build(self, root as usize, depth))
                .collect()
        })
    }

    /// Scores whole rows (row-major values) with the compact layout: tree by tree over a block
    /// of rows, [`LANES`] rows walked together so that their independent paths overlap in the
    /// CPU (a step is a chain of two dependent loads; with 8 chains in flight the core is close
    /// to its instruction throughput instead of waiting on load latency, 4 chains were not
    /// enough and more spill registers).
    ///
    /// Values and thresholds are compared as order-preserving `u64` keys (see
    /// [`order_key`]; `x > τ` exactly when `key(x) > key(τ)` for finite x), which compiles
    /// to a compare and a flag-to-register move. Rows are copied into fixed-width `[u64; S]`
    /// arrays (S = d rounded up to a power of two) so feature lookups need no bounds check.
    fn score_rows_compact<const S: usize>(
        &self,
        trees: &[CompactTree],
        values: &[f64],
    ) -> Vec<f64> {
        let d = self.n_features;
        let depth = self.compact_depth();
        let bottom = 1usize << depth;
        let mask = COMPACT_SLOTS - 1;
        let mut out = Vec::with_capacity(values.len() / d);
        let mut sums = [0f64; BLOCK];
        let mut keys = [[0u64; S]; BLOCK];
        for block in values.chunks(BLOCK * d) {
            let b = block.len() / d;
            for (k, row) in keys.iter_mut().zip(block.chunks_exact(d)) {
                for (k, &v) in k.iter_mut().zip(row) {
                    *k = order_key(v);
                }
            }
            sums[..b].fill(0.0);
            for t in trees {
                let mut groups = keys[..b].chunks_exact(LANES);
                let mut r = 0;
                for g in groups.by_ref() {
                    let mut i = [1usize; LANES];
                    for _ in 0..depth {
                        for l in 0..LANES {
                            let j = i[l] & mask;
                            i[l] = 2 * i[l]
                                + usize::from(g[l][t.feature[j] as usize & (S - 1)] > t.split[j]);
                        }
                    }
                    for l in 0..LANES {
                        sums[r + l] += t.leaf[(i[l] - bottom) & mask];
                    }
                    r += LANES;
                }
                for x in groups.remainder() {
                    let mut i = 1usize;
                    for _ in 0..depth {
                        let j = i & mask;
                        i = 2 * i + usize::from(x[t.feature[j] as usize & (S - 1)] > t.split[j]);
                    }
                    sums[r] += t.leaf[(i - bottom) & mask];
                    r += 1;
                }
            }
            out.extend(sums[..b].iter().map(|&s| self.to_score(s)));
        }
        out
    }

    /// Scores whole rows (row-major values).
    fn score_rows(&self, values: &[f64]) -> Vec<f64> {
        let Some(trees) = &self.compact else {
            return self.score_rows_generic(values);
        };
        match self.n_features {
            1 => self.score_rows_compact::<1>(trees, values),
            2 => self.score_rows_compact::<2>(trees, values),
            3..=4 => self.score_rows_compact::<4>(trees, values),
            5..=8 => self.score_rows_compact::<8>(trees, values),
            9..=16 => self.score_rows_compact::<16>(trees, values),
            17..=32 => self.score_rows_compact::<32>(trees, values),
            33..=64 => self.score_rows_compact::<64>(trees, values),
            _ => self.score_rows_generic(values),
        }
    }

    /// Scores a block of whole rows (row-major values), tree by tree, level by level, on the
    /// pointer layout (any depth).
    fn score_rows_generic(&self, values: &[f64]) -> Vec<f64> {
        let d = self.n_features;
        let mut out = Vec::with_capacity(values.len() / d);
        let mut cur = [0u32; BLOCK];
        let mut sums = [0f64; BLOCK];
        for block in values.chunks(BLOCK * d) {
            let b = block.len() / d;
            sums[..b].fill(0.0);
            for t in 0..self.n_trees() {
                let root = self.tree_start[t];
                cur[..b].fill(root);
                for _ in 0..self.tree_depth[t] {
                    for (r, c) in cur[..b].iter_mut().enumerate() {
                        let node = self.nodes[*c as usize];
                        let v = block[r * d + node.feature as usize];
                        *c = node.left + u32::from(v > node.split);
                    }
                }
                for (s, &c) in sums[..b].iter_mut().zip(&cur[..b]) {
                    *s += self.leaf_value[c as usize];
                }
            }
            out.extend(sums[..b].iter().map(|&s| self.to_score(s)));
        }
        out
    }

    /// Scores every row of `x` (single-threaded).
    pub fn score_batch(&self, x: &Matrix) -> AnomalyResult<Vec<f64>> {
        self.check_width(x.n_cols())?;
        Ok(self.score_rows(x.values()))
    }

    /// [`IsolationForest::score_batch`] split over `threads` OS threads (same results).
    pub fn score_batch_parallel(&self, x: &Matrix, threads: usize) -> AnomalyResult<Vec<f64>> {
        self.check_width(x.n_cols())?;
        Ok(map_rows(x, threads, |rows| self.score_rows(rows)))
    }

    fn check_width(&self, found: usize) -> AnomalyResult<()> {
        if found == self.n_features {
            Ok(())
        } else {
            Err(AnomalyError::DimensionMismatch {
                expected: self.n_features,
                found,
            })
        }
    }

    /// Per-feature attribution of `row`'s score, largest first.
    ///
    /// Attribution = bits of isolation: at each split on the row's path, the split feature is
    /// credited log2(n_node / n_child), where n are the training-subsample rows reaching the
    /// node and the child the row goes to. A feature that cuts the row off from most of the
    /// sample, early, gets a large credit. Credits are averaged over trees; per tree they sum
    /// to log2(ψ / n_leaf), so a row isolated quickly has a large total.
    pub fn explain(&self, row: &[f64]) -> AnomalyResult<Vec<FeatureContribution>> {
        check_row(row, self.n_features)?;
        let mut credit = vec![0.0; self.n_features];
        for t in 0..self.n_trees() {
            let mut i = self.tree_start[t] as usize;
            loop {
                let node = self.nodes[i];
                if node.left as usize == i {
                    break;
                }
                let f = node.feature as usize;
                let next = node.left as usize + usize::from(row[f] > node.split);
                credit[f] +=
                    (f64::from(self.n_samples[i]) / f64::from(self.n_samples[next])).log2();
                i = next;
            }
        }
        let n_trees = self.n_trees() as f64;
        let contributions = credit
            .into_iter()
            .enumerate()
            .map(|(feature, c)| FeatureContribution {
                feature,
                contribution: c / n_trees,
                tail: None,
            })
            .collect();
        Ok(sort_contributions(contributions))
    }

    /// Score above which a row is flagged as anomalous.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Whether `score` is above the threshold.
    pub fn is_anomaly(&self, score: f64) -> bool {
        score > self.threshold
    }

    /// Number of trees.
    pub fn n_trees(&self) -> usize {
        self.tree_depth.len()
    }

    /// Number of features the forest was fitted on.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Subsample size ψ used per tree.
    pub fn sample_size(&self) -> usize {
        self.sample_size
    }

    /// Seed the forest was grown from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Contamination the threshold came from (`None` = auto).
    pub fn contamination(&self) -> Option<f64> {
        self.contamination
    }

    /// Raw parts for serialization: nodes, node sizes and tree boundaries.
    pub(crate) fn parts(&self) -> (&[Node], &[u32], &[u32]) {
        (&self.nodes, &self.n_samples, &self.tree_start)
    }

    /// Rebuilds a forest from decoded parts, re-deriving leaf values and depths and checking
    /// that every tree is a proper tree (children after parents, inside the tree, features in
    /// range, depth within the height limit).
    // One argument per decoded field, in format order; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        n_features: usize,
        sample_size: usize,
        seed: u64,
        nodes: Vec<Node>,
        n_samples: Vec<u32>,
        tree_start: Vec<u32>,
        contamination: Option<f64>,
        threshold: f64,
    ) -> AnomalyResult<Self> {
        let bad = |m: String| AnomalyError::Decode(format!("isolation forest: {m}"));
        if n_features == 0 || sample_size == 0 || tree_start.len() < 2 {
            return Err(bad("empty model".into()));
        }
        if n_samples.len() != nodes.len()
            || *tree_start.last().expect("len >= 2") as usize != nodes.len()
            || tree_start[0] != 0
        {
            return Err(bad("array lengths do not match".into()));
        }
        let max_depth = height_limit(sample_size);
        let mut depth = vec![0usize; nodes.len()];
        let mut leaf_value = vec![0.0; nodes.len()];
        let mut tree_depth = Vec::with_capacity(tree_start.len() - 1);
        for w in tree_start.windows(2) {
            let (start, end) = (w[0] as usize, w[1] as usize);
            if start >= end {
                return Err(bad("empty tree".into()));
            }
            let mut deepest = 0;
            for i in start..end {
                let node = nodes[i];
                if node.left as usize == i {
                    if node.split != f64::INFINITY {
                        return Err(bad(format!("leaf {i} has a finite threshold")));
                    }
                    leaf_value[i] = depth[i] as f64 + average_path_length(n_samples[i] as usize);
                    deepest = deepest.max(depth[i]);
                } else {
                    let l = node.left as usize;
                    if l <= i || l + 1 >= end || node.feature as usize >= n_features {
                        return Err(bad(format!("node {i} has invalid children or feature")));
                    }
                    if !node.split.is_finite() || depth[i] >= max_depth {
                        return Err(bad(format!("node {i} has an invalid split or depth")));
                    }
                    depth[l] = depth[i] + 1;
                    depth[l + 1] = depth[i] + 1;
                }
            }
            tree_depth.push(deepest as u8);
        }
        if let Some(c) = contamination
            && !(c > 0.0 && c <= 0.5)
        {
            return Err(bad(format!("contamination {c} out of range")));
        }
        let mut forest = Self {
            n_features,
            sample_size,
            seed,
            nodes,
            n_samples,
            leaf_value,
            tree_start,
            tree_depth,
            contamination,
            threshold,
            compact: None,
        };
        forest.compact = forest.build_compact();
        Ok(forest)
    }
}

#[cfg(test)]
mod tests {
    use crate::anomaly::iforest::{IForestParams, IsolationForest, height_limit};
    use crate::anomaly::matrix::Matrix;
    use crate::anomaly::rng::Rng;

    #[test]
    fn height_limit_is_ceil_log2() {
        assert_eq!(height_limit(1), 1);
        assert_eq!(height_limit(2), 1);
        assert_eq!(height_limit(3), 2);
        assert_eq!(height_limit(256), 8);
        assert_eq!(height_limit(257), 9);
    }

    #[test]
    fn compact_layout_scores_like_the_pointer_layout() {
        let mut rng = Rng::new(1);
        for d in [1usize, 3, 9, 17, 70] {
            let values: Vec<f64> = (0..600 * d).map(|_| rng.next_f64() * 10.0 - 5.0).collect();
            let x = Matrix::new(values, d).unwrap();
            let forest = IsolationForest::fit(&x, &IForestParams::default()).unwrap();
            assert!(forest.compact.is_some());
            let fast = forest.score_batch(&x).unwrap();
            let slow = forest.score_rows_generic(x.values());
            assert_eq!(fast, slow, "d = {d}");
        }
        // ψ > 256 grows deeper trees and uses the pointer layout.
        let values: Vec<f64> = (0..2000).map(|_| rng.next_f64()).collect();
        let x = Matrix::new(values, 2).unwrap();
        let params = IForestParams {
            sample_size: Some(1000),
            ..IForestParams::default()
        };
        let forest = IsolationForest::fit(&x, &params).unwrap();
        assert!(forest.compact.is_none());
        assert_eq!(
            forest.score_one(x.row(3)).unwrap(),
            forest.score_batch(&x).unwrap()[3]
        );
    }
}
