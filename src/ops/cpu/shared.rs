//! A pointer that tasks writing disjoint parts of one buffer may share: the CPU kernels' rayon
//! tasks (here and in the bf16 products) each write their own rows of one output.

#[derive(Clone, Copy)]
pub(in crate::ops) struct Shared(pub(in crate::ops) *mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Through a method, so closures capture the Send wrapper rather than its raw field.
    pub(in crate::ops) fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}
