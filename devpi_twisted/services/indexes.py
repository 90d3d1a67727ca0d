"""
Indexes: create, read, modify, delete, with devpi's options and checks.
"""

from typing import Any

from devpi_twisted.errors import BadRequest, Conflict, Forbidden, NotFound
from devpi_twisted.interfaces import IReadView, IStorage, IWriteTransaction
from devpi_twisted.model import indexconfig, keys
from devpi_twisted.model.acl import Policy
from devpi_twisted.model.names import checkName
from devpi_twisted.services.users import deleteIndexContents


def _findCycle(view: IReadView, name: str, bases: list[str]) -> bool:
    """Whether following C{bases} from index C{name} leads back to it."""
    pending = list(bases)
    seen = set()
    while pending:
        base = pending.pop()
        if base == name:
            return True
        if base in seen:
            continue
        seen.add(base)
        user, _, index = base.partition("/")
        config = view.get(keys.indexKey(user, index)) or {}
        pending.extend(config.get("bases", []))
    return False


def _checkBases(view: IReadView, name: str, config: dict[str, Any]) -> None:
    problems = []
    for base in config.get("bases", []):
        user, _, index = base.partition("/")
        if base == name or view.get(keys.indexKey(user, index)) is None:
            problems.append(f"base index {base!r} does not exist")
    if problems:
        raise BadRequest(", ".join(problems))
    if _findCycle(view, name, config.get("bases", [])):
        raise BadRequest(f"bases of {name} would form a cycle")


def _storeIndex(txn: IWriteTransaction, user: str, index: str, config: dict[str, Any]) -> dict[str, Any]:
    """Write an index's configuration once its bases are known to exist and form no cycle."""
    _checkBases(txn, f"{user}/{index}", config)
    txn.set(keys.indexKey(user, index), config)
    return config


def _indexesNamed(view: IReadView, names: set[str]) -> dict[str, list[str]]:
    """The existing C{user/index} names of the indexes called one of C{names}."""
    found: dict[str, list[str]] = {}
    for key, _ in view.items(keys.INDEX):
        user, _, index = key[len(keys.INDEX):].partition("/")
        if index in names:
            found.setdefault(index, []).append(f"{user}/{index}")
    return {name: sorted(full) for name, full in found.items()}


def projectNames(view: IReadView, user: str, index: str) -> list[str]:
    prefix = keys.projectsPrefix(user, index)
    return sorted(key[len(prefix):] for key, _ in view.items(prefix))


class Indexes:
    """The index operations of the JSON API."""

    def __init__(self, storage: IStorage, policy: Policy, mirrorCacheExpiry: int = 1800) -> None:
        self._storage = storage
        self._policy = policy
        self._mirrorCacheExpiry = mirrorCacheExpiry

    async def get(self, user: str, index: str, withProjects: bool) -> dict[str, Any]:
        def _get(view: IReadView) -> dict[str, Any] | None:
            config = view.get(keys.indexKey(user, index))
            if config is None:
                return None
            if withProjects:
                config["projects"] = projectNames(view, user, index)
            return config

        result = await self._storage.read(_get)
        if result is None:
            raise NotFound(f"The stage {user}/{index} could not be found.")
        return result

    async def exists(self, user: str, index: str) -> bool:
        found = await self._storage.read(lambda view: view.get(keys.indexKey(user, index)))
        return found is not None

    async def _suggestBases(self, bases: Any) -> None:
        """
        A base given without its user (C{bases=pypi}) is refused with a
        hint at the existing indexes of that name (C{root/pypi}).
        """
        try:
            items = indexconfig.parseList(bases)
        except BadRequest:
            return  # coerce() says what is wrong with it
        bare = {item for item in items if "/" not in item}
        if not bare:
            return
        found = await self._storage.read(lambda view: _indexesNamed(view, bare))
        problems = []
        for item in items:
            if item in found:
                guesses = " or ".join(repr(full) for full in found[item])
                problems.append(f"invalid base index spec: {item!r}, bases are USER/INDEX: did you mean {guesses}?")
        if problems:
            raise BadRequest(", ".join(problems))

    def _checkMirrorRights(self, requester: str | None, config: dict[str, Any], changed: bool) -> None:
        if changed and not self._policy.mayConfigureMirror(requester):
            raise Forbidden(
                "only root may create mirror indexes or set 'mirror_url' "
                "(the server fetches from it); see --mirror-creators"
            )

    async def create(self, requester: str | None, user: str, index: str, body: Any) -> dict[str, Any]:
        checkName("indexname", index)
        name = f"{user}/{index}"
        if not isinstance(body, dict):
            raise BadRequest("index config must be a JSON object")
        # devpi looks the user up before it checks permissions: a missing
        # user is 404 for everyone (checked again in the transaction).
        if await self._storage.read(lambda view: view.get(keys.userKey(user))) is None:
            raise NotFound(f"no user {user!r}")
        if not self._policy.mayManageIndex(requester, user):
            raise Forbidden(f"no permission to create index {name}")
        indexType = body.get("type", indexconfig.STAGE)
        if indexType not in indexconfig.INDEX_TYPES:
            raise BadRequest(f"unknown index type {indexType!r}")
        config = indexconfig.defaults(indexType, user, self._mirrorCacheExpiry)
        config.update(body)
        if indexType == indexconfig.STAGE:
            await self._suggestBases(config.get("bases"))
        config = indexconfig.coerce(config, dropForeign=True)
        if indexType == indexconfig.MIRROR:
            if "mirror_url" not in config:
                raise BadRequest("a mirror index needs 'mirror_url'")
            self._checkMirrorRights(requester, config, changed=True)

        def _create(txn: IWriteTransaction) -> dict[str, Any]:
            if txn.get(keys.userKey(user)) is None:
                raise NotFound(f"no user {user!r}")
            if txn.get(keys.indexKey(user, index)) is not None:
                raise Conflict(f"index {name!r} exists")
            return _storeIndex(txn, user, index, config)

        _, result = await self._storage.write(_create)
        return result

    async def modify(
        self, requester: str | None, user: str, index: str, body: Any, errorOnNoop: bool
    ) -> dict[str, Any]:
        name = f"{user}/{index}"
        if not self._policy.mayManageIndex(requester, user):
            raise Forbidden(f"no permission to modify index {name}")
        if isinstance(body, dict) and body.get("type") == "indexconfig" and isinstance(body.get("result"), dict):
            body = body["result"]
        if not isinstance(body, (dict, list)):
            raise BadRequest("expected a JSON object or a list of key=value edits")
        current = await self.get(user, index, withProjects=False)
        if isinstance(body, list):
            proposed = indexconfig.applyEdits(current, body)
        else:
            proposed = dict(current)
            proposed.update({k: v for k, v in body.items() if k != "projects"})
        if proposed.get("type") != current["type"]:
            raise BadRequest("the 'type' of an index can't be changed")
        if proposed.get("type") == indexconfig.STAGE:
            await self._suggestBases(proposed.get("bases"))
        proposed = indexconfig.coerce(proposed, dropForeign=isinstance(body, dict))
        self._checkMirrorRights(
            requester, proposed, changed=proposed.get("mirror_url") != current.get("mirror_url")
        )
        if errorOnNoop and proposed == current:
            raise BadRequest("The requested modifications resulted in no changes")

        def _modify(txn: IWriteTransaction) -> dict[str, Any]:
            if txn.get(keys.indexKey(user, index)) != current:
                raise Conflict(f"index {name} was changed concurrently, try again")
            return _storeIndex(txn, user, index, proposed)

        _, result = await self._storage.write(_modify)
        return result

    async def delete(self, requester: str | None, user: str, index: str) -> None:
        name = f"{user}/{index}"
        if not self._policy.mayManageIndex(requester, user):
            raise Forbidden(f"no permission to delete index {name}")

        def _delete(txn: IWriteTransaction) -> None:
            config = txn.get(keys.indexKey(user, index))
            if config is None:
                raise NotFound(f"The stage {name} could not be found.")
            if not config.get("volatile", True):
                raise Forbidden(f"index {name} non-volatile, cannot delete")
            deleteIndexContents(txn, user, index)
            txn.delete(keys.indexKey(user, index))

        await self._storage.write(_delete)
