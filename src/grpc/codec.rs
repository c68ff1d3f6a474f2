//! The protobuf codec of Picket's generated services and clients: tonic-prost's,
//! except for a message that cannot be decoded (a string that is not UTF-8, a
//! malformed field). tonic-prost answers those INTERNAL with prost's text;
//! here they are INVALID_ARGUMENT with a `BadRequest` field violation naming the
//! field, with the index of the repeated top-level field it sits in
//! (`events[3].actor`), as every other invalid input is.

use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::OnceLock;

use prost::Message;
use prost::bytes::{Buf, Bytes};
use tonic::Status;
use tonic::codec::{DecodeBuf, EncodeBuf};
use tonic_prost::ProstEncoder;

use crate::domain::FieldViolation;
use crate::error::AppError;
use crate::grpc::status::to_status;

/// The codec named in `build.rs` (`codec_path`).
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = Encoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        Encoder(ProstEncoder::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(PhantomData)
    }
}

/// tonic-prost's encoder.
#[derive(Debug, Clone)]
pub struct Encoder<T>(ProstEncoder<T>);

impl<T: Message> tonic::codec::Encoder for Encoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.0.encode(item, dst)
    }
}

/// Decodes `U`; a failure names the field.
#[derive(Debug, Clone)]
pub struct Decoder<U>(PhantomData<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // Zero-copy: the frame's bytes, kept to locate a failure.
        let bytes = src.copy_to_bytes(src.remaining());
        match U::decode(bytes.clone()) {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => Err(to_status(AppError::InvalidArgument(vec![violation::<U>(
                &bytes, &e,
            )]))),
        }
    }
}

/// The field violation a decode error stands for. prost reports the path as
/// `Message.field: ` pairs (innermost first) before its description; only its
/// text carries them.
fn violation<U: Message + Default>(bytes: &Bytes, err: &prost::DecodeError) -> FieldViolation {
    let text = err.to_string();
    let mut rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    let mut stack = Vec::new();
    while let Some((head, tail)) = rest.split_once(": ") {
        match head.split_once('.') {
            Some((m, f)) if is_ident(m) && is_ident(f) => {
                stack.push((m, f));
                rest = tail;
            }
            _ => break,
        }
    }
    stack.reverse();
    let mut path = String::new();
    for (i, (message, field)) in stack.iter().enumerate() {
        if i > 0 {
            path.push('.');
        }
        path.push_str(field);
        if i == 0
            && is_repeated(message, field)
            && let Some(index) = failing_index::<U>(bytes)
        {
            path.push_str(&format!("[{index}]"));
        }
    }
    let description = if rest.contains("not UTF-8") {
        "must be valid UTF-8".to_owned()
    } else {
        format!("could not be decoded as protobuf: {rest}")
    };
    FieldViolation::new(path, description)
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `message.field` is a repeated field of `picket.v1`.
fn is_repeated(message: &str, field: &str) -> bool {
    static REPEATED: OnceLock<HashSet<(String, String)>> = OnceLock::new();
    REPEATED
        .get_or_init(|| {
            let mut out = HashSet::new();
            let set = prost_types::FileDescriptorSet::decode(crate::grpc::FILE_DESCRIPTOR_SET)
                .expect("the compiled descriptor set decodes");
            let mut messages: Vec<&prost_types::DescriptorProto> =
                set.file.iter().flat_map(|f| &f.message_type).collect();
            while let Some(m) = messages.pop() {
                messages.extend(&m.nested_type);
                for f in &m.field {
                    if f.label() == prost_types::field_descriptor_proto::Label::Repeated {
                        out.insert((m.name().to_owned(), f.name().to_owned()));
                    }
                }
            }
            out
        })
        .contains(&(message.to_owned(), field.to_owned()))
}

/// Which occurrence of its top-level field the failure is in: the shortest
/// prefix of top-level fields that fails to decode ends with it (a binary
/// search; decoding a prefix fails once it holds the bad field).
fn failing_index<U: Message + Default>(bytes: &[u8]) -> Option<usize> {
    let fields = top_level_fields(bytes)?;
    let fails = |k: usize| U::decode(&bytes[..fields[k - 1].1]).is_err();
    let (mut lo, mut hi) = (1, fields.len());
    if hi == 0 || !fails(hi) {
        return None;
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fails(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let tag = fields[lo - 1].0;
    Some(fields[..lo - 1].iter().filter(|(t, _)| *t == tag).count())
}

/// (field number, end offset) of each top-level field; `None` if the framing
/// itself is broken.
fn top_level_fields(mut buf: &[u8]) -> Option<Vec<(usize, usize)>> {
    let total = buf.len();
    let mut out = Vec::new();
    while buf.has_remaining() {
        // A length delimiter is a varint: the one public varint decoder.
        let key = prost::decode_length_delimiter(&mut buf).ok()?;
        let len = match key & 7 {
            0 => {
                prost::decode_length_delimiter(&mut buf).ok()?;
                0
            }
            1 => 8,
            2 => prost::decode_length_delimiter(&mut buf).ok()?,
            5 => 4,
            _ => return None,
        };
        if buf.remaining() < len {
            return None;
        }
        buf.advance(len);
        out.push((key >> 3, total - buf.remaining()));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::pb;

    fn decode_err(bytes: Vec<u8>) -> FieldViolation {
        let bytes = Bytes::from(bytes);
        let err = pb::IngestRequest::decode(bytes.clone()).unwrap_err();
        violation::<pb::IngestRequest>(&bytes, &err)
    }

    #[test]
    fn invalid_utf8_names_the_event_and_field() {
        let event = |actor: &str| pb::Event {
            event_type: "user.login".into(),
            actor: actor.into(),
            ..Default::default()
        };
        let mut bytes = pb::IngestRequest {
            events: vec![event("a"), event("b"), event("@@@@"), event("c")],
        }
        .encode_to_vec();
        let at = bytes.windows(4).position(|w| w == b"@@@@").unwrap();
        bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
        let v = decode_err(bytes);
        assert_eq!(v.field, "events[2].actor");
        assert_eq!(v.description, "must be valid UTF-8");
    }

    #[test]
    fn garbage_is_described_without_a_path() {
        let v = decode_err(vec![0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(v.description.starts_with("could not be decoded"), "{v:?}");
    }
}
