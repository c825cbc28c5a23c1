//! Why a subcommand could not start.

/// What stops a process role at start; once running, roles log problems and keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Folder(#[from] tidegate_controller::source::folder::Error),
    #[error(transparent)]
    Proxy(#[from] tidegate_proxy::StartError),
    #[error("cannot start: {0}")]
    Start(String),
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
}
