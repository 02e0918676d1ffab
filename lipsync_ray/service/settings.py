"""The service's settings, built once by ``lipsync-ray serve`` and handed to the deployment.

The bearer token is resolved here, the one place the service reads the environment:
``LIPSYNC_RAY_TOKEN``, else ``--token-file``, else the file ``token`` in the state directory
(created with mode 0600 when missing).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from lipsync_ray.config import RenderConfig
from lipsync_ray.errors import InputError, ServiceError

__all__ = [
    "TOKEN_ENV",
    "ServiceSettings",
    "default_state_dir",
    "prepare_state_dir",
    "resolve_token",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "LIPSYNC_RAY_TOKEN"
TOKEN_FILE_NAME = "token"
MIN_TOKEN_CHARS = 16  # a shorter token is refused: it could be guessed


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the deployment needs; picklable (it travels to the Serve replica)."""

    avatars: str  # AVATARS_DIR: a local folder or a storage URI holding avatar bundles by name
    config: RenderConfig  # the service's render settings (a request may change a few)
    state_dir: Path  # the job database, the jobs' directories (audio, work dir, MP4)
    token: str = field(repr=False)  # the bearer token every /v1 request must carry
    host: str = "127.0.0.1"
    port: int = 8000
    max_warm: int = 1  # warm Renderers kept (least recently used evicted)
    max_running: int = 4  # jobs rendering at once; the others wait in the queue
    max_upload_bytes: int = 50 * 2**20  # request body limit
    drain_timeout_s: float = 30.0  # on SIGINT/SIGTERM: how long running jobs may go on

    def __post_init__(self) -> None:
        checks = [
            (self.max_warm >= 1, f"--max-warm must be >= 1, got {self.max_warm}"),
            (self.max_running >= 1, f"--max-running must be >= 1, got {self.max_running}"),
            (
                self.max_upload_bytes >= 1,
                f"--max-upload-mb must be > 0, got {self.max_upload_bytes / 2**20:g}",
            ),
            (
                self.drain_timeout_s >= 0,
                f"--drain-timeout must be >= 0 s, got {self.drain_timeout_s:g}",
            ),
            (0 <= self.port <= 65535, f"--port must be in 0..65535, got {self.port}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def default_state_dir() -> Path:
    return Path.home() / ".lipsync-ray" / "serve"


def prepare_state_dir(state_dir: Path) -> Path:
    """Create the state directory (mode 0700) when missing; returns it absolute."""
    state_dir = Path(state_dir).expanduser().absolute()
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ServiceError(f"cannot create the state directory: {exc}", path=state_dir) from None
    if not state_dir.is_dir():
        raise ServiceError("the state directory is not a directory", path=state_dir)
    return state_dir


def resolve_token(
    state_dir: Path, token_file: Path | None = None, env: dict[str, str] | None = None
) -> tuple[str, str]:
    """The bearer token and where it came from (for the log line).

    ``env`` defaults to ``os.environ``. Raises ServiceError for an unreadable or empty token
    file and InputError for a token shorter than MIN_TOKEN_CHARS."""
    env = os.environ if env is None else env
    value = env.get(TOKEN_ENV, "")
    if value.strip():
        return _checked(value.strip(), f"${TOKEN_ENV}"), f"${TOKEN_ENV}"
    if token_file is not None:
        return _checked(_read(Path(token_file)), str(token_file)), str(token_file)
    path = Path(state_dir) / TOKEN_FILE_NAME
    if not path.exists():
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another service made it meanwhile: read theirs
            return _checked(_read(path), str(path)), str(path)
        except OSError as exc:
            raise ServiceError(f"cannot create the token file: {exc}", path=path) from None
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.info("created a new token in %s (mode 0600)", path)
        return token, str(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("token file %s is readable by others (mode %o): chmod 600 it", path, mode)
    return _checked(_read(path), str(path)), str(path)


def _read(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceError(f"cannot read the token file: {exc}", path=path) from None
    if not token:
        raise ServiceError("the token file is empty", path=path)
    return token


def _checked(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise InputError(
            f"the token must be >= {MIN_TOKEN_CHARS} characters without spaces, "
            f"got {len(token)} characters",
            path=where,
        )
    return token
