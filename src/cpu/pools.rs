//! Views of one layer's plane and state pools as host byte slices, the check that they are as
//! large as the layout says, and the per-(page, head, slot) rows of every plane. Kept apart so
//! that the stages read rows through one place that knows the plane layout.

use crate::ensure;
use crate::layout::{Layout, SIKV_NUM_PLANES};
use crate::status::Result;

/// One layer's pools, writable.
pub struct LayerMut<'a> {
    /// One slice per plane: the whole plane of this layer (`layout.plane_bytes[p]`), empty
    /// for absent planes.
    pub planes: [&'a mut [u8]; SIKV_NUM_PLANES],
    /// The layer's state pool (`layout.layer_state_bytes`).
    pub state: &'a mut [u8],
}

/// One layer's pools, read-only.
#[derive(Clone, Copy)]
pub struct LayerRef<'a> {
    pub planes: [&'a [u8]; SIKV_NUM_PLANES],
    pub state: &'a [u8],
}

fn check_pools(layout: &Layout, plane_lens: [usize; SIKV_NUM_PLANES], state_len: usize) -> Result<()> {
    for (p, len) in plane_lens.iter().enumerate() {
        ensure!(
            *len >= layout.plane_bytes[p],
            SIKV_ERR_BUFFER_TOO_SMALL,
            "plane {} has {} bytes, the layout needs {}",
            crate::layout::PLANE_NAMES[p],
            len,
            layout.plane_bytes[p]
        );
    }
    ensure!(
        state_len >= layout.layer_state_bytes,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "the state pool has {state_len} bytes, the layout needs {}",
        layout.layer_state_bytes
    );
    Ok(())
}

pub(super) fn check_pools_mut(layout: &Layout, layer: &LayerMut) -> Result<()> {
    check_pools(
        layout,
        std::array::from_fn(|p| layer.planes[p].len()),
        layer.state.len(),
    )
}

pub(super) fn check_pools_ref(layout: &Layout, layer: &LayerRef) -> Result<()> {
    check_pools(
        layout,
        std::array::from_fn(|p| layer.planes[p].len()),
        layer.state.len(),
    )
}

pub(super) fn rows_mut<'b>(
    layout: &Layout,
    planes: &'b mut [&mut [u8]; SIKV_NUM_PLANES],
    page: usize,
    head: usize,
    slot: usize,
) -> [&'b mut [u8]; SIKV_NUM_PLANES] {
    let mut out: [&'b mut [u8]; SIKV_NUM_PLANES] = Default::default();
    for (p, (plane, o)) in planes.iter_mut().zip(out.iter_mut()).enumerate() {
        let len = layout.format.row_bytes[p];
        if len > 0 {
            let off = layout.row_offset(p, page, head, slot);
            *o = &mut plane[off..off + len];
        }
    }
    out
}

pub(super) fn rows_ref<'b>(
    layout: &Layout,
    planes: &[&'b [u8]; SIKV_NUM_PLANES],
    page: usize,
    head: usize,
    slot: usize,
) -> [&'b [u8]; SIKV_NUM_PLANES] {
    let mut out: [&'b [u8]; SIKV_NUM_PLANES] = Default::default();
    for p in 0..SIKV_NUM_PLANES {
        let len = layout.format.row_bytes[p];
        if len > 0 {
            let off = layout.row_offset(p, page, head, slot);
            out[p] = &planes[p][off..off + len];
        }
    }
    out
}
