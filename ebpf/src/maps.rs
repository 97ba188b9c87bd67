//! Rust mirrors of bpf/netd_maps.h, for reading and writing the maps from netd. Same
//! field order, same explicit padding; `layouts_match_the_c_header` holds them to what
//! the C compiler makes of the header. Addresses and ports in network byte order.

/// A service address: VIP, port, protocol (6 TCP, 17 UDP).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// The backends of a VIP: `count` entries of [`BackendKey`] `{service, 0..count}`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VipValue {
    pub service: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service: u32,
    pub index: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendValue {
    pub addr: u32,
    pub pad: u32,
}

/// A socket (its cookie) and the backend it talks to.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RevNatValue {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
}

/// Counters are per VIP and backend address, so they outlive a backend change.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub vip: u32,
    pub backend: u32,
}

/// Per backend, per CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub connections: u64,
}

// SAFETY: plain #[repr(C)] integers with explicit padding fields: every bit pattern is a
// valid value and there are no implicit padding bytes.
unsafe impl aya::Pod for VipKey {}
unsafe impl aya::Pod for VipValue {}
unsafe impl aya::Pod for BackendKey {}
unsafe impl aya::Pod for BackendValue {}
unsafe impl aya::Pod for RevNatKey {}
unsafe impl aya::Pod for RevNatValue {}
unsafe impl aya::Pod for CounterKey {}
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// What the C compiler made of the header (names as in C).
    #[allow(non_upper_case_globals)]
    mod c {
        include!(concat!(env!("OUT_DIR"), "/layout.rs"));
    }
    use c::*;

    #[test]
    fn layouts_match_the_c_header() {
        assert_eq!(size_of::<VipKey>(), netd_vip_key_SIZE);
        assert_eq!(offset_of!(VipKey, addr), netd_vip_key_addr);
        assert_eq!(offset_of!(VipKey, port), netd_vip_key_port);
        assert_eq!(offset_of!(VipKey, proto), netd_vip_key_proto);
        assert_eq!(size_of::<VipValue>(), netd_vip_value_SIZE);
        assert_eq!(offset_of!(VipValue, service), netd_vip_value_service);
        assert_eq!(offset_of!(VipValue, count), netd_vip_value_count);
        assert_eq!(size_of::<BackendKey>(), netd_backend_key_SIZE);
        assert_eq!(offset_of!(BackendKey, service), netd_backend_key_service);
        assert_eq!(offset_of!(BackendKey, index), netd_backend_key_index);
        assert_eq!(size_of::<BackendValue>(), netd_backend_value_SIZE);
        assert_eq!(offset_of!(BackendValue, addr), netd_backend_value_addr);
        assert_eq!(size_of::<RevNatKey>(), netd_revnat_key_SIZE);
        assert_eq!(offset_of!(RevNatKey, cookie), netd_revnat_key_cookie);
        assert_eq!(offset_of!(RevNatKey, addr), netd_revnat_key_addr);
        assert_eq!(offset_of!(RevNatKey, port), netd_revnat_key_port);
        assert_eq!(size_of::<RevNatValue>(), netd_revnat_value_SIZE);
        assert_eq!(offset_of!(RevNatValue, vip), netd_revnat_value_vip);
        assert_eq!(offset_of!(RevNatValue, port), netd_revnat_value_port);
        assert_eq!(size_of::<CounterKey>(), netd_counter_key_SIZE);
        assert_eq!(offset_of!(CounterKey, vip), netd_counter_key_vip);
        assert_eq!(offset_of!(CounterKey, backend), netd_counter_key_backend);
        assert_eq!(size_of::<Counter>(), netd_counter_SIZE);
        assert_eq!(offset_of!(Counter, connections), netd_counter_connections);
    }
}
