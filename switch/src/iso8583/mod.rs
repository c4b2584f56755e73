//! ISO 8583 codec (Switchyard profile v1, SPEC §3): messages, field definitions, packagers
//! and length-prefixed framing. Pure: no I/O, no async.

mod bitmap;
mod field;
pub mod fields;
mod frame;
mod message;
mod packager;
pub mod private_data;

pub use bitmap::{Bitmap, BitmapIter};
pub use field::{Charset, FieldError, FieldKind, FieldSpec, ISO8583_1987};
pub use frame::{FrameError, decode_frame, encode_frame};
pub use message::{Message, Mti, MtiError};
pub use packager::{
    BinaryEncoding, BitmapEncoding, MacLayoutError, PackError, Packager, ProfileError,
    UnknownPackager, UnpackError, UnpackReason, mac_field_for,
};
