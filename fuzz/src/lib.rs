//! Helpers shared by the fuzz targets: how a fuzz input encodes a size limit and the points
//! where a byte stream is cut into the chunks a socket would deliver.

/// A fuzz input taken apart: a limit, chunk lengths, and the stream they cut.
#[derive(Debug)]
pub struct Chunked<'a> {
    /// A size limit in `1..=16321` bytes (small limits reach the "too large" paths quickly).
    pub limit: usize,
    /// The stream, delivered in pieces by [`Chunked::chunks`].
    pub stream: &'a [u8],
    lengths: &'a [u8],
}

impl<'a> Chunked<'a> {
    /// Reads `[limit selector, count, count chunk lengths..., stream...]`; `None` when the input is
    /// too short for its own header.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&[selector, count], rest) = data.split_first_chunk::<2>()?;
        let count = usize::from(count % 32);
        let lengths = rest.get(..count)?;
        Some(Self {
            limit: 1 + usize::from(selector) * 64,
            stream: &rest[count..],
            lengths,
        })
    }

    /// The stream cut into pieces whose lengths cycle through the encoded lengths (a length of 0
    /// is an empty read); one piece when no lengths are encoded.
    pub fn chunks(&self) -> Vec<&'a [u8]> {
        split(self.stream, self.lengths, |_, at| at)
    }

    /// Like [`Chunked::chunks`] for text: each cut moves forward to the next character boundary.
    pub fn text_chunks(text: &'a str, lengths: &[u8]) -> Vec<&'a str> {
        let mut pieces = Vec::new();
        let mut start = 0;
        let cuts = split(text.as_bytes(), lengths, |bytes, mut at| {
            while at < bytes.len() && (bytes[at] & 0xC0) == 0x80 {
                at += 1;
            }
            at
        });
        for piece in cuts {
            let end = start + piece.len();
            pieces.push(&text[start..end]);
            start = end;
        }
        pieces
    }

    /// The encoded chunk lengths.
    pub fn lengths(&self) -> &'a [u8] {
        self.lengths
    }
}

/// Cuts `bytes` at lengths cycling through `lengths`; `adjust(bytes, at)` may move a cut forward.
fn split<'a>(
    bytes: &'a [u8],
    lengths: &[u8],
    adjust: impl Fn(&[u8], usize) -> usize,
) -> Vec<&'a [u8]> {
    if lengths.is_empty() {
        return vec![bytes];
    }
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut next = lengths.iter().cycle();
    while start < bytes.len() {
        let length = usize::from(*next.next().unwrap_or(&0));
        let end = adjust(bytes, (start + length).min(bytes.len()));
        pieces.push(&bytes[start..end]);
        start = end;
        if pieces.len() > bytes.len() + lengths.len() {
            // Only zero lengths: deliver the rest at once rather than loop forever.
            pieces.push(&bytes[start..]);
            break;
        }
    }
    pieces
}
