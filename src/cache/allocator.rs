//! Page allocator: a free list with reference counts, so forked sequences share full pages.

use crate::ensure;
use crate::status::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageAllocator {
    /// Free page ids; popped from the end, so the lowest ids are handed out first.
    free: Vec<u32>,
    /// References per page (0 = free).
    refs: Vec<u32>,
}

impl PageAllocator {
    pub fn new(num_pages: u32) -> Self {
        PageAllocator {
            free: (0..num_pages).rev().collect(),
            refs: vec![0; num_pages as usize],
        }
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    pub fn num_pages(&self) -> usize {
        self.refs.len()
    }

    /// Takes `n` pages or none at all.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>> {
        ensure!(
            n <= self.free.len(),
            SIKV_ERR_OUT_OF_PAGES,
            "page pool exhausted: {n} pages needed, {} free of {}",
            self.free.len(),
            self.refs.len()
        );
        let pages: Vec<u32> = (0..n).map(|_| self.free.pop().unwrap()).collect();
        for &p in &pages {
            self.refs[p as usize] = 1;
        }
        Ok(pages)
    }

    /// Adds a reference to a page already in use (fork).
    pub fn share(&mut self, page: u32) {
        debug_assert!(self.refs[page as usize] > 0);
        self.refs[page as usize] += 1;
    }

    pub fn refs(&self, page: u32) -> u32 {
        self.refs[page as usize]
    }

    /// Drops one reference per page; pages reaching zero return to the free list.
    pub fn release(&mut self, pages: &[u32]) {
        for &p in pages {
            let r = &mut self.refs[p as usize];
            debug_assert!(*r > 0);
            *r -= 1;
            if *r == 0 {
                self.free.push(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_is_all_or_nothing_and_refcounted() {
        let mut a = PageAllocator::new(4);
        let p = a.alloc(3).unwrap();
        assert_eq!(p, vec![0, 1, 2]);
        let before = a.clone();
        let e = a.alloc(2).unwrap_err();
        assert_eq!(e.status, crate::SikvStatus::SIKV_ERR_OUT_OF_PAGES);
        assert_eq!(a, before);
        a.share(1);
        a.release(&p);
        assert_eq!(a.free_pages(), 3);
        assert_eq!(a.refs(1), 1);
        a.release(&[1]);
        assert_eq!(a.free_pages(), 4);
    }
}
