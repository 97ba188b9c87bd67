//! `netd-cni`: the CNI plugin binary (type `netd`). See `netd::frontends::cni`.

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let env = netd::frontends::cni::Env::from_process();
    let mut stdin = vec![];
    // VERSION may come with nothing on stdin; any other command without a config fails
    // in the config's parser with the spec's decode error.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let (out, ok) = netd::frontends::cni::run(&env, &stdin);
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
