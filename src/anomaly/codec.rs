//! Versioned little-endian byte encoding of fitted models.
//!
//! Layout: magic `PKAN`, format version (u16), model kind (u8: 1 = Isolation Forest,
//! 2 = ECOD/COPOD), then the model body. All integers and floats are little-endian. Decoding
//! checks the magic, the version, every length and every structural invariant, so corrupted or
//! foreign bytes give [`AnomalyError::Decode`] rather than a panic or a wrong score.

use crate::anomaly::ecod::{Ecod, EcodAggregation};
use crate::anomaly::error::{AnomalyError, AnomalyResult};
use crate::anomaly::iforest::{IsolationForest, Node};

/// Version of the byte format written by [`crate::anomaly::AnomalyModel::to_bytes`]. Bump it on
/// any layout change; decoding rejects versions it does not know.
pub const FORMAT_VERSION: u16 = 1;

const MAGIC: &[u8; 4] = b"PKAN";
pub(crate) const KIND_IFOREST: u8 = 1;
pub(crate) const KIND_ECOD: u8 = 2;

/// Appends little-endian values to a buffer.
#[derive(Default)]
struct Writer {
    /// Bytes written so far.
    buf: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// Reads little-endian values, failing cleanly on truncation.
struct Reader<'a> {
    /// Bytes not yet consumed.
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> AnomalyResult<&'a [u8]> {
        if self.rest.len() < n {
            return Err(AnomalyError::Decode("truncated input".into()));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self) -> AnomalyResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> AnomalyResult<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> AnomalyResult<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> AnomalyResult<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f64(&mut self) -> AnomalyResult<f64> {
        Ok(f64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A count that must fit the remaining input at `item_size` bytes per item.
    fn count(&mut self, item_size: usize) -> AnomalyResult<usize> {
        let n = self.u64()? as usize;
        if n.checked_mul(item_size).is_none_or(|b| b > self.rest.len()) {
            return Err(AnomalyError::Decode("length exceeds input".into()));
        }
        Ok(n)
    }
    fn usize(&mut self) -> AnomalyResult<usize> {
        usize::try_from(self.u64()?).map_err(|_| AnomalyError::Decode("size overflow".into()))
    }
}

fn header(w: &mut Writer, kind: u8) {
    w.buf.extend_from_slice(MAGIC);
    w.u16(FORMAT_VERSION);
    w.u8(kind);
}

/// Encodes a forest.
pub(crate) fn encode_iforest(m: &IsolationForest) -> Vec<u8> {
    let mut w = Writer::default();
    header(&mut w, KIND_IFOREST);
    let (nodes, n_samples, tree_start) = m.parts();
    w.u64(m.n_features() as u64);
    w.u64(m.sample_size() as u64);
    w.u64(m.seed());
    w.f64(m.contamination().unwrap_or(f64::NAN));
    w.f64(m.threshold());
    w.u64(tree_start.len() as u64);
    for &s in tree_start {
        w.u32(s);
    }
    w.u64(nodes.len() as u64);
    for (node, &n) in nodes.iter().zip(n_samples) {
        w.f64(node.split);
        w.u32(node.feature);
        w.u32(node.left);
        w.u32(n);
    }
    w.buf
}

/// Encodes an ECOD/COPOD model.
pub(crate) fn encode_ecod(m: &Ecod) -> Vec<u8> {
    let mut w = Writer::default();
    header(&mut w, KIND_ECOD);
    w.u64(m.n_training_rows() as u64);
    w.u64(m.n_features() as u64);
    w.u8(m.aggregation().code());
    w.f64(m.contamination());
    w.f64(m.threshold());
    for &s in m.skew_signs() {
        w.u8(s as u8);
    }
    for &v in m.sorted_columns() {
        w.f64(v);
    }
    w.buf
}

/// A decoded model of either kind.
pub(crate) enum Decoded {
    /// Bytes held an Isolation Forest.
    IForest(IsolationForest),
    /// Bytes held an ECOD/COPOD model.
    Ecod(Ecod),
}

/// Decodes bytes written by [`encode_iforest`] or [`encode_ecod`].
pub(crate) fn decode(bytes: &[u8]) -> AnomalyResult<Decoded> {
    let mut r = Reader { rest: bytes };
    if r.take(4)? != MAGIC {
        return Err(AnomalyError::Decode("not a Picket anomaly model".into()));
    }
    let version = r.u16()?;
    if version != FORMAT_VERSION {
        return Err(AnomalyError::Decode(format!(
            "format version {version} is not supported (this build reads {FORMAT_VERSION})"
        )));
    }
    let decoded = match r.u8()? {
        KIND_IFOREST => {
            let n_features = r.usize()?;
            let sample_size = r.usize()?;
            let seed = r.u64()?;
            let contamination = r.f64()?;
            let threshold = r.f64()?;
            let n_trees1 = r.count(4)?;
            let tree_start = (0..n_trees1)
                .map(|_| r.u32())
                .collect::<AnomalyResult<_>>()?;
            let n_nodes = r.count(20)?;
            let mut nodes = Vec::with_capacity(n_nodes);
            let mut n_samples = Vec::with_capacity(n_nodes);
            for _ in 0..n_nodes {
                let split = r.f64()?;
                let feature = r.u32()?;
                let left = r.u32()?;
                nodes.push(Node {
                    split,
                    feature,
                    left,
                });
                n_samples.push(r.u32()?);
            }
            Decoded::IForest(IsolationForest::from_parts(
                n_features,
                sample_size,
                seed,
                nodes,
                n_samples,
                tree_start,
                (!contamination.is_nan()).then_some(contamination),
                threshold,
            )?)
        }
        KIND_ECOD => {
            let n_rows = r.usize()?;
            let n_features = r.usize()?;
            let aggregation = EcodAggregation::from_code(r.u8()?)
                .ok_or_else(|| AnomalyError::Decode("unknown ECOD aggregation".into()))?;
            let contamination = r.f64()?;
            let threshold = r.f64()?;
            let total = n_rows
                .checked_mul(n_features)
                .and_then(|t| t.checked_mul(8))
                .filter(|&b| b + n_features <= r.rest.len())
                .ok_or_else(|| AnomalyError::Decode("length exceeds input".into()))?;
            let skew_signs = (0..n_features)
                .map(|_| r.u8().map(|b| b as i8))
                .collect::<AnomalyResult<_>>()?;
            let sorted = (0..total / 8)
                .map(|_| r.f64())
                .collect::<AnomalyResult<_>>()?;
            Decoded::Ecod(Ecod::from_parts(
                n_rows,
                n_features,
                sorted,
                skew_signs,
                aggregation,
                contamination,
                threshold,
            )?)
        }
        k => return Err(AnomalyError::Decode(format!("unknown model kind {k}"))),
    };
    if !r.rest.is_empty() {
        return Err(AnomalyError::Decode(
            "trailing bytes after the model".into(),
        ));
    }
    Ok(decoded)
}
