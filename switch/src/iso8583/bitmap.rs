//! The ISO 8583 field-presence bitmap: which of fields 1..=128 a message carries.

use std::fmt;

/// Presence of fields 1..=128 as two 64-bit words.
///
/// Word 0 is the primary bitmap and word 1 the secondary; within a word the most significant
/// bit is the lowest field number, which is exactly the big-endian wire order, so packing a
/// bitmap is `to_be_bytes` and iterating fields in order is `leading_zeros`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Bitmap([u64; 2]);

impl Bitmap {
    /// A bitmap with no field set.
    pub const fn new() -> Self {
        Self([0, 0])
    }

    /// Builds a bitmap from the primary and secondary words as they appear on the wire.
    pub const fn from_words(primary: u64, secondary: u64) -> Self {
        Self([primary, secondary])
    }

    /// The primary bitmap word (fields 1..=64).
    pub const fn primary(&self) -> u64 {
        self.0[0]
    }

    /// The secondary bitmap word (fields 65..=128).
    pub const fn secondary(&self) -> u64 {
        self.0[1]
    }

    /// Splits a field number into (word, bit mask); `None` outside 1..=128.
    const fn locate(field: u8) -> Option<(usize, u64)> {
        if field == 0 || field > 128 {
            return None;
        }
        let index = (field - 1) as usize;
        Some((index / 64, 1u64 << (63 - index % 64)))
    }

    /// Whether `field` is set; always false outside 1..=128.
    pub const fn contains(&self, field: u8) -> bool {
        match Self::locate(field) {
            Some((word, mask)) => self.0[word] & mask != 0,
            None => false,
        }
    }

    /// Sets `field`; numbers outside 1..=128 are ignored (callers check the range first).
    pub fn insert(&mut self, field: u8) {
        if let Some((word, mask)) = Self::locate(field) {
            self.0[word] |= mask;
        }
    }

    /// Clears `field`; numbers outside 1..=128 are ignored.
    pub fn remove(&mut self, field: u8) {
        if let Some((word, mask)) = Self::locate(field) {
            self.0[word] &= !mask;
        }
    }

    /// Number of fields set.
    pub const fn len(&self) -> usize {
        (self.0[0].count_ones() + self.0[1].count_ones()) as usize
    }

    /// Whether no field is set.
    pub const fn is_empty(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0
    }

    /// Number of set fields with a number lower than `field`: the position `field` has (or
    /// would have) in a list of the set fields in ascending order.
    pub const fn rank(&self, field: u8) -> usize {
        let index = if field == 0 {
            0
        } else if field > 128 {
            128
        } else {
            (field - 1) as usize
        };
        let (word, bit) = (index / 64, index % 64);
        let mut count = if word == 1 {
            self.0[0].count_ones()
        } else if word == 2 {
            self.0[0].count_ones() + self.0[1].count_ones()
        } else {
            0
        };
        // Fields below `field` in the same word are the `bit` most significant bits.
        if word < 2 && bit > 0 {
            count += (self.0[word] >> (64 - bit)).count_ones();
        }
        count as usize
    }

    /// The highest field number set, if any.
    pub const fn last(&self) -> Option<u8> {
        if self.0[1] != 0 {
            Some((128 - self.0[1].trailing_zeros()) as u8)
        } else if self.0[0] != 0 {
            Some((64 - self.0[0].trailing_zeros()) as u8)
        } else {
            None
        }
    }

    /// The set field numbers in ascending order.
    pub fn iter(&self) -> BitmapIter {
        BitmapIter { words: self.0 }
    }
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl IntoIterator for &Bitmap {
    type Item = u8;
    type IntoIter = BitmapIter;

    fn into_iter(self) -> BitmapIter {
        self.iter()
    }
}

/// Iterator over the field numbers set in a [`Bitmap`], ascending.
#[derive(Debug, Clone)]
pub struct BitmapIter {
    words: [u64; 2],
}

impl Iterator for BitmapIter {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        for (word_index, word) in self.words.iter_mut().enumerate() {
            if *word != 0 {
                let bit = word.leading_zeros();
                *word &= !(1u64 << (63 - bit));
                // bit < 64 and word_index < 2, so the result is in 1..=128.
                return Some((word_index as u32 * 64 + bit + 1) as u8);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.words[0].count_ones() + self.words[1].count_ones()) as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for BitmapIter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_order_puts_field_one_in_the_most_significant_bit() {
        let mut bitmap = Bitmap::new();
        bitmap.insert(1);
        bitmap.insert(64);
        bitmap.insert(65);
        bitmap.insert(128);
        assert_eq!(bitmap.primary(), 0x8000_0000_0000_0001);
        assert_eq!(bitmap.secondary(), 0x8000_0000_0000_0001);
        assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![1, 64, 65, 128]);
        assert_eq!(bitmap.last(), Some(128));
    }

    #[test]
    fn out_of_range_numbers_are_never_set() {
        let mut bitmap = Bitmap::new();
        bitmap.insert(0);
        bitmap.insert(129);
        bitmap.insert(255);
        assert!(bitmap.is_empty());
        assert!(!bitmap.contains(0));
        assert!(!bitmap.contains(200));
    }

    #[test]
    fn rank_counts_lower_fields_across_both_words() {
        let bitmap = {
            let mut b = Bitmap::new();
            for n in [2, 3, 4, 64, 70, 128] {
                b.insert(n);
            }
            b
        };
        assert_eq!(bitmap.rank(2), 0);
        assert_eq!(bitmap.rank(3), 1);
        assert_eq!(bitmap.rank(5), 3);
        assert_eq!(bitmap.rank(64), 3);
        assert_eq!(bitmap.rank(65), 4);
        assert_eq!(bitmap.rank(70), 4);
        assert_eq!(bitmap.rank(128), 5);
        assert_eq!(bitmap.rank(129), 6);
        assert_eq!(bitmap.len(), 6);
    }
}
