"""Realistic Bitrix24 traffic, for tests, benchmarks and `ledger simulate`.

Pure and deterministic for a seed. Portals follow the lifecycle real ones have: install, bots
joining chats, messages (sometimes to two v1 bots at once), edits, message deletions, commands,
v2 reactions and context requests, bot deletions, app updates, uninstall (which ends every bot) and
reinstall with a fresh token. `ts` drifts and is sometimes out of order, as queued events are. A few
anomalies are made on purpose: deleting a bot nobody saw, deleting one twice, activity after
deletion.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

WORDS = ("hello", "привет", "report", "deploy", "[b]urgent[/b]", "a&b=c", "ok 👍", "status?",
         "Grüße", "[url=https://x.test/?a=1&b=2]link[/url]", "100%", "question")


@dataclass
class SimBot:
    bot_id: int
    code: str
    v2: bool
    alive: bool = True


@dataclass
class SimPortal:
    member_id: str
    domain: str
    token: str
    installed: bool = False
    installs: int = 0
    ts: int = 1_760_000_000
    bots: list[SimBot] = field(default_factory=list)

    def alive_bots(self) -> list[SimBot]:
        return [b for b in self.bots if b.alive]


@dataclass(frozen=True)
class SimDelivery:
    document: dict[str, Any]
    query: str
    portal: SimPortal


class Traffic:
    """An endless, seeded stream of deliveries across `portals` portals."""

    def __init__(
        self, *, seed: int = 1, portals: int = 5, webhook_share: float = 0.2, churn: bool = True
    ) -> None:
        """`churn=False` keeps every portal installed (stable tokens), e.g. for benchmarks."""
        self._churn = churn
        self._random = random.Random(seed)  # noqa: S311 - simulated traffic, not secrets
        self._next_id = 1000
        self._message_id = 10_000
        self.portals = [self._portal(i) for i in range(portals)]
        self._webhook = {p.member_id: self._random.random() < webhook_share for p in self.portals}

    def _portal(self, index: int) -> SimPortal:
        member_id = hashlib.md5(f"portal-{index}".encode(), usedforsecurity=False).hexdigest()
        return SimPortal(member_id, f"portal-{index}.bitrix24.test", self._token(),
                         ts=1_760_000_000 + index * 977)

    def _token(self) -> str:
        return f"{self._random.getrandbits(128):032x}"

    def __iter__(self) -> Iterator[SimDelivery]:
        while True:
            yield self.next()

    def next(self) -> SimDelivery:
        portal = self._random.choice(self.portals)
        portal.ts += self._random.randint(0, 40)
        ts = portal.ts - (self._random.randint(1, 90) if self._random.random() < 0.05 else 0)
        document = self._event(portal, ts)
        query = f"CLIENT_ID={portal.member_id[:12]}" if self._webhook[portal.member_id] else ""
        return SimDelivery(document, query, portal)

    # ---- choosing what happens -----------------------------------------------------------

    def _event(self, portal: SimPortal, ts: int) -> dict[str, Any]:
        r = self._random
        if not portal.installed:
            return self._install(portal, ts)
        alive = portal.alive_bots()
        roll = r.random()
        if not alive or roll < 0.04:
            return self._join(portal, self._new_bot(portal), ts)
        bot = r.choice(alive)
        if roll < 0.55:
            return self._message(portal, bot, ts, "ADD")
        if roll < 0.63:
            return self._message(portal, bot, ts, "UPDATE")
        if roll < 0.67:
            return self._message(portal, bot, ts, "DELETE")
        if roll < 0.78:
            return self._command(portal, bot, ts)
        if roll < 0.84:
            return self._join(portal, bot, ts)
        if roll < 0.88 and bot.v2:
            return self._v2_other(portal, bot, ts)
        if roll < 0.93:
            return self._delete(portal, bot, ts)
        if roll < 0.94:
            return self._delete(portal, SimBot(self._new_id(), "ghost", False, False), ts)
        if roll < 0.95 and portal.bots:
            dead = [b for b in portal.bots if not b.alive]
            if dead:  # a deleted bot shows up again: repeated deletion or late activity
                ghost = r.choice(dead)
                if r.random() < 0.5:
                    return self._delete(portal, ghost, ts)
                return self._message(portal, ghost, ts, "ADD")
        if roll < 0.97:
            return self._lifecycle(portal, ts, "ONAPPUPDATE")
        if roll < 0.985 and self._churn:
            return self._uninstall(portal, ts)
        return self._message(portal, bot, ts, "ADD")

    def _new_id(self) -> int:
        self._next_id += self._random.randint(1, 7)
        return self._next_id

    def _new_bot(self, portal: SimPortal) -> SimBot:
        v2 = self._random.random() < 0.4
        bot_id = self._new_id()
        bot = SimBot(bot_id, f"{'v2' if v2 else 'bot'}_{bot_id}", v2)
        portal.bots.append(bot)
        return bot

    # ---- building the documents ----------------------------------------------------------

    def _auth(self, portal: SimPortal, user_id: int | None) -> dict[str, Any]:
        auth: dict[str, Any] = {
            "access_token": self._token() + "0000071b",
            "expires": str(portal.ts + 3600),
            "expires_in": "3600",
            "scope": "imbot",
            "domain": portal.domain,
            "server_endpoint": "https://oauth.bitrix.info/rest/",
            "status": "F",
            "client_endpoint": f"https://{portal.domain}/rest/",
            "member_id": portal.member_id,
        }
        if user_id is not None:
            auth["user_id"] = str(user_id)
        auth["refresh_token"] = self._token()
        auth["application_token"] = portal.token
        return auth

    def _envelope(
        self, portal: SimPortal, event: str, data: dict[str, Any], ts: int, user: int | None
    ) -> dict[str, Any]:
        return {"event": event, "event_handler_id": str(400 + len(event)), "data": data,
                "ts": str(ts), "auth": self._auth(portal, user)}

    def _user(self) -> int:
        return self._random.randint(1, 60)

    def _v1_bot(self, portal: SimPortal, bot: SimBot) -> dict[str, Any]:
        entry = self._auth(portal, bot.bot_id)
        entry["client_id"] = portal.member_id[:32]
        return {**entry, "AUTH": dict(entry), "BOT_ID": str(bot.bot_id), "BOT_CODE": bot.code}

    def _v2_bot(self, portal: SimPortal, bot: SimBot) -> dict[str, Any]:
        return {"id": str(bot.bot_id), "code": bot.code, "auth": self._auth(portal, bot.bot_id)}

    def _install(self, portal: SimPortal, ts: int) -> dict[str, Any]:
        if portal.installs:
            portal.token = self._token()  # a reinstall brings a new token
        portal.installed = True
        portal.installs += 1
        return self._lifecycle(portal, ts, "ONAPPINSTALL")

    def _lifecycle(self, portal: SimPortal, ts: int, event: str) -> dict[str, Any]:
        data = {"VERSION": f"1.{portal.installs}.{self._random.randint(0, 9)}",
                "LANGUAGE_ID": self._random.choice(["en", "de", "ru"])}
        if event == "ONAPPINSTALL":
            data |= {"ACTIVE": "Y", "INSTALLED": "Y"}
        return self._envelope(portal, event, data, ts, self._user())

    def _uninstall(self, portal: SimPortal, ts: int) -> dict[str, Any]:
        portal.installed = False
        for bot in portal.bots:
            bot.alive = False
        auth = {k: v for k, v in self._auth(portal, None).items()
                if k in ("domain", "server_endpoint", "client_endpoint", "member_id",
                         "application_token")}
        return {"event": "ONAPPUNINSTALL", "data": {"LANGUAGE_ID": "en", "CLEAN": "1"},
                "ts": str(ts), "auth": auth}

    def _message(self, portal: SimPortal, bot: SimBot, ts: int, kind: str) -> dict[str, Any]:
        r, user = self._random, self._user()
        if kind == "ADD":
            self._message_id += 1
        text = " ".join(r.choice(WORDS) for _ in range(r.randint(1, 6)))
        if bot.v2:
            data = {"bot": self._v2_bot(portal, bot),
                    "message": {"id": str(self._message_id), "chatId": str(user + 100),
                                "authorId": str(user), "text": text, "isSystem": "0"},
                    "chat": {"id": str(user + 100), "dialogId": f"chat{user + 100}",
                             "type": "chat"},
                    "user": {"id": str(user), "name": f"User {user}"}, "language": "en"}
            return self._envelope(portal, f"ONIMBOTV2MESSAGE{kind}", data, ts, user)
        bots = {str(bot.bot_id): self._v1_bot(portal, bot)}
        others = [b for b in portal.alive_bots() if not b.v2 and b is not bot]
        if others and kind == "ADD" and r.random() < 0.1:  # one message to two bots
            other = r.choice(others)
            bots[str(other.bot_id)] = self._v1_bot(portal, other)
        data = {"BOT": bots,
                "PARAMS": {"MESSAGE": text, "MESSAGE_ID": str(self._message_id),
                           "MESSAGE_TYPE": "P", "FROM_USER_ID": str(user),
                           "DIALOG_ID": str(user), "TO_USER_ID": str(bot.bot_id),
                           "CHAT_TYPE": "P", "LANGUAGE": "en"},
                "USER": {"ID": str(user), "NAME": f"User {user}", "IS_BOT": "N"}}
        return self._envelope(portal, f"ONIMBOTMESSAGE{kind}", data, ts, user)

    def _command(self, portal: SimPortal, bot: SimBot, ts: int) -> dict[str, Any]:
        user, command_id = self._user(), self._random.randint(1, 300)
        self._message_id += 1
        if bot.v2:
            data = {"bot": self._v2_bot(portal, bot),
                    "command": {"id": str(command_id), "command": "/help", "params": "topic",
                                "context": "textarea"},
                    "message": {"id": str(self._message_id), "text": "/help topic"},
                    "user": {"id": str(user)}, "language": "en"}
            return self._envelope(portal, "ONIMBOTV2COMMANDADD", data, ts, user)
        entry = self._v1_bot(portal, bot)
        del entry["AUTH"]
        entry |= {"COMMAND": "echo", "COMMAND_ID": str(command_id), "COMMAND_PARAMS": "x",
                  "COMMAND_CONTEXT": "TEXTAREA", "MESSAGE_ID": str(self._message_id)}
        data = {"COMMAND": {str(command_id): entry},
                "PARAMS": {"MESSAGE": "/echo x", "MESSAGE_ID": str(self._message_id),
                           "FROM_USER_ID": str(user), "DIALOG_ID": str(user)},
                "USER": {"ID": str(user), "NAME": f"User {user}"}}
        return self._envelope(portal, "ONIMCOMMANDADD", data, ts, user)

    def _join(self, portal: SimPortal, bot: SimBot, ts: int) -> dict[str, Any]:
        user = self._user()
        if bot.v2:
            data = {"bot": self._v2_bot(portal, bot), "dialogId": f"chat{user}",
                    "chat": {"id": str(user), "type": "chat"}, "user": {"id": str(user)},
                    "language": "en"}
            return self._envelope(portal, "ONIMBOTV2JOINCHAT", data, ts, user)
        data = {"BOT": {str(bot.bot_id): self._v1_bot(portal, bot)},
                "PARAMS": {"CHAT_TYPE": "P", "BOT_ID": str(bot.bot_id), "USER_ID": str(user),
                           "DIALOG_ID": str(user), "LANGUAGE": "en"},
                "USER": {"ID": str(user), "NAME": f"User {user}"}}
        return self._envelope(portal, "ONIMBOTJOINCHAT", data, ts, user)

    def _v2_other(self, portal: SimPortal, bot: SimBot, ts: int) -> dict[str, Any]:
        user = self._user()
        data: dict[str, Any]
        if self._random.random() < 0.5:
            data = {"bot": self._v2_bot(portal, bot),
                    "reaction": {"messageId": str(self._message_id), "reaction": "like",
                                 "action": "add"}, "user": {"id": str(user)}}
            return self._envelope(portal, "ONIMBOTV2REACTIONCHANGE", data, ts, user)
        data = {"bot": self._v2_bot(portal, bot), "dialogId": f"chat{user}",
                "user": {"id": str(user)}}
        return self._envelope(portal, "ONIMBOTV2CONTEXTGET", data, ts, user)

    def _delete(self, portal: SimPortal, bot: SimBot, ts: int) -> dict[str, Any]:
        bot.alive = False
        user = self._user()
        if bot.v2:
            return self._envelope(portal, "ONIMBOTV2DELETE",
                                  {"bot": self._v2_bot(portal, bot)}, ts, user)
        return self._envelope(portal, "ONIMBOTDELETE",
                              {"BOT_ID": str(bot.bot_id), "BOT_CODE": bot.code}, ts, user)
