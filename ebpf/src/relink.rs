//! A pinned XDP link outlives the netd that made it (the fast path keeps working while
//! netd restarts), so a new netd finds the old program running there. It has to put its
//! own program on that link, atomically (no packet meets no program), or an upgrade would
//! keep running the old code against maps the new netd fills in a new way.

use std::io;
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{loaded_programs, Xdp};

/// What a pinned link runs, as the kernel describes the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedProgram {
    pub id: u32,
    /// The program's name (at most 15 bytes of its function name).
    pub name: String,
    /// The kernel's hash of the program's instructions (map references left out): the
    /// same code loaded twice has the same tag.
    pub tag: u64,
    /// The program's named (pinned) maps, sorted: the same code with maps made anew (a reshaped
    /// map unpinned and created again) has the same tag and must still be replaced, or it
    /// would keep reading the orphaned maps.
    pub map_ids: Vec<u32>,
}

/// The ids of the program's named maps (the pinned ones). Its data sections (`.rodata`
/// with the load-time settings) are made anew with every load, so their ids say nothing:
/// a change of a setting alone (the UDP idle time, a test knob) waits for the next
/// replacement; the flow table's size reshapes a pinned map and is seen.
fn map_ids(info: &aya::programs::ProgramInfo, pin: &Path) -> io::Result<Vec<u32>> {
    let mut ids = vec![];
    for id in info
        .map_ids()
        .map_err(|e| error("list the maps of the program for", pin, e))?
        .unwrap_or_default()
    {
        let map =
            aya::maps::MapInfo::from_id(id).map_err(|e| error("describe a map of", pin, e))?;
        if !map.name_as_str().unwrap_or_default().contains('.') {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn error(what: &str, pin: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what} {}: {e}", pin.display()))
}

/// The program the link pinned at `pin` runs.
pub fn linked_program(pin: &Path) -> io::Result<LinkedProgram> {
    let link = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| error("open link", pin, e))?);
    let id = link
        .info()
        .map_err(|e| error("describe link", pin, e))?
        .program_id();
    let info = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .ok_or_else(|| error("find the program of link", pin, format!("no program {id}")))?;
    Ok(LinkedProgram {
        id,
        name: info.name_as_str().unwrap_or_default().to_string(),
        tag: info.tag(),
        map_ids: map_ids(&info, pin)?,
    })
}

/// Makes the XDP link pinned at `pin` run `prog` (loaded) unless it runs the same code
/// on the same maps already; true if it replaced the program. The replacement is one `BPF_LINK_UPDATE`:
/// every packet meets either the old program or the new one. The pin keeps the link.
pub fn relink_xdp(prog: &mut Xdp, pin: &Path) -> io::Result<bool> {
    let ours = prog
        .info()
        .map_err(|e| error("describe the program for", pin, e))?;
    let linked = linked_program(pin)?;
    if linked.tag == ours.tag() && linked.map_ids == map_ids(&ours, pin)? {
        return Ok(false);
    }
    let link = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| error("open link", pin, e))?);
    let link = XdpLink::try_from(link).map_err(|e| error("not an XDP link:", pin, e))?;
    let id = prog
        .attach_to_link(link)
        .map_err(|e| error("replace the program of link", pin, e))?;
    // The program keeps the link's descriptor until it is dropped; the pin is what holds
    // the link, so ours is closed now (that detaches nothing).
    drop(
        prog.take_link(id)
            .map_err(|e| error("release link", pin, e))?,
    );
    Ok(true)
}

/// As [`relink_xdp`], with program `name` of the compiled `object` on maps of its own:
/// for the lab, to put another program on a link as an older netd would have left it.
/// Maps the object pins by name go to a directory beside the link's pin, removed again
/// once the program holds them (no pin is left in the root of bpffs).
pub fn relink_object(pin: &Path, object: &[u8], name: &str) -> io::Result<bool> {
    let mut maps = pin.as_os_str().to_owned();
    maps.push("_maps");
    let maps = std::path::PathBuf::from(maps);
    std::fs::create_dir_all(&maps).map_err(|e| error("make", &maps, e))?;
    let loaded = aya::EbpfLoader::new()
        .default_map_pin_directory(&maps)
        .load(object)
        .map_err(|e| error("load the object for", pin, e));
    let removed = std::fs::remove_dir_all(&maps).map_err(|e| error("remove", &maps, e));
    let mut obj = loaded?;
    removed?;
    let prog: &mut Xdp = obj
        .program_mut(name)
        .ok_or_else(|| error("no program", pin, name))?
        .try_into()
        .map_err(|e| error("not an XDP program for", pin, e))?;
    prog.load()
        .map_err(|e| error("the kernel refused the program for", pin, e))?;
    relink_xdp(prog, pin)
}
