"""The passwords of the fleet's hosts: one private file per host in MONK_DATA_DIR/hosts/.

Beside the embedded server's superuser password and the JWT secret, under the same rules:
root's (or monk's user's) files, 0600 in a 0700 folder, written atomically, never inside the
system database (whose dumps, logs and readers would see them), and out of the embedded
server's sight (its mount namespace shows it only its own files). A file is named by the
host row's id, not its name: two ``host add`` of one name never touch each other's file.
"""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

from monk.adapters import files
from monk.errors import ConfigError


class HostSecrets:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, host_id: UUID) -> Path:
        return self.folder / f"{host_id}.json"

    def put(self, host_id: UUID, password: str) -> None:
        try:
            files.write_private(self._path(host_id), json.dumps({"password": password}))
        except OSError as exc:
            raise ConfigError(
                f"cannot store the host's password in {self.folder}: {exc.strerror or exc}"
            ) from None

    def get(self, host_id: UUID) -> str | None:
        """The stored password; None when the host was added without one."""
        path = self._path(host_id)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            password = json.loads(raw)["password"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{path} is damaged: remove the host and add it again with its URL"
            ) from None
        if not isinstance(password, str):
            raise ConfigError(f"{path} is damaged: remove the host and add it again")
        return password

    def remove(self, host_id: UUID) -> None:
        self._path(host_id).unlink(missing_ok=True)

    def ids(self) -> set[UUID]:
        """The hosts that have a file here."""
        found: set[UUID] = set()
        try:
            entries = list(self.folder.glob("*.json"))
        except OSError:
            return found
        for path in entries:
            try:
                found.add(UUID(path.stem))
            except ValueError:
                continue
        return found
