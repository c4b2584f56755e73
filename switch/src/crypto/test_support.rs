//! Test helpers shared by the crypto unit tests.

/// A deterministic "RNG" so a block we wrap is a fixed string that an independent
/// implementation can check. Test-only: it is of course not random.
pub(crate) struct CountingRng(pub(crate) u8);

impl rand::TryRng for CountingRng {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for b in dst {
            *b = self.0;
            self.0 = self.0.wrapping_add(1);
        }
        Ok(())
    }
}

impl rand::TryCryptoRng for CountingRng {}
