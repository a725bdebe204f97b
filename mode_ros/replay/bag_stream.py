"""Streaming, fault-tolerant rosbag2 reading for replay (ROS-free: ``rosbags`` + a small salvage reader).

:class:`BagStream` opens a bag directory, ``.db3`` or ``.mcap`` file with ``rosbags`` and yields raw
CDR messages in receive-time order. When ``rosbags`` cannot open the bag (truncated file, missing
``metadata.yaml``, a recording that was killed) or fails part-way, it falls back to salvaging what
is readable and records a problem that names the file and the cause:

* MCAP: the records are parsed sequentially from the start (schemas, channels, messages, chunks
  decompressed with the same codecs as rosbags); a chunk that fails its CRC or decompression is
  skipped, a truncated record ends the file.
* SQLite: a copy with the header's page count fixed to the pages actually present is read by rowid
  (= recording order) until the first unreadable page.

Salvaged messages come in file order; a small re-order buffer restores time order locally.
"""
from __future__ import annotations

import heapq
import os
import shutil
import sqlite3
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["BagStream", "BagReadError", "TopicInfo"]

MCAP_MAGIC = b"\x89MCAP0\r\n"


class BagReadError(Exception):
    """Nothing at all can be read from the bag; the message names the path and the cause."""


@dataclass
class TopicInfo:
    topic: str
    msgtype: str
    count: int = 0
    msgdef: str = ""


def _storage_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted([p for p in path.iterdir() if p.suffix in (".mcap", ".db3")])


class BagStream:
    def __init__(self, path: str | os.PathLike, reorder: int = 32):
        self.path = Path(path)
        self.reorder = int(reorder)
        self.topics: dict[str, TopicInfo] = {}
        self.problems: list[str] = []
        self.salvaged = False
        self.storage = ""
        self.start_ns: int | None = None
        self.end_ns: int | None = None
        self.typestore = None
        self._reader = None
        self._tmp: str | None = None
        self.read_errors = 0

    # ---- open --------------------------------------------------------------------------------------
    def open(self) -> "BagStream":
        if not self.path.exists():
            raise BagReadError(f"bag {self.path} does not exist")
        from rosbags.rosbag2 import Reader

        try:
            r = Reader(self.path)
            r.open()
        except Exception as exc:  # noqa: BLE001 - anything rosbags cannot open goes to the salvage path
            self._salvage_open(f"{type(exc).__name__}: {exc}")
            return self
        self._reader = r
        for c in r.connections:
            ti = self.topics.get(c.topic)
            md = getattr(c, "msgdef", None)
            if ti is None:
                self.topics[c.topic] = TopicInfo(c.topic, c.msgtype, int(c.msgcount or 0),
                                                 md.data if md is not None and md.data else "")
            else:
                ti.count += int(c.msgcount or 0)
        if r.message_count:
            self.start_ns, self.end_ns = int(r.start_time), int(r.end_time)
        files = _storage_files(self.path)
        self.storage = {".mcap": "mcap", ".db3": "sqlite3"}.get(files[0].suffix, "") if files else ""
        from mode_ros.data.bag import bag_typestore

        self.typestore = bag_typestore(r.connections)
        return self

    def _salvage_open(self, why: str) -> None:
        files = _storage_files(self.path) if self.path.is_dir() or self.path.suffix in (".mcap", ".db3") else []
        if not files:
            raise BagReadError(f"cannot open bag {self.path}: {why} (and no .mcap/.db3 file to salvage)")
        self.salvaged = True
        self.storage = {".mcap": "mcap", ".db3": "sqlite3"}[files[0].suffix]
        self._files = files
        total = 0
        notes = []
        for f in files:
            try:
                n, note = self._scan_file(f)
            except Exception as exc:  # noqa: BLE001
                n, note = 0, f"unreadable ({type(exc).__name__}: {exc})"
            total += n
            notes.append(f"{f.name}: {note}")
        if total == 0:
            raise BagReadError(f"cannot read bag {self.path}: {why}; salvage found no readable message "
                               f"({'; '.join(notes)})")
        self.problems.append(f"bag {self.path} is truncated or corrupt ({why}); salvaged {total} readable "
                             f"messages — {'; '.join(notes)}")
        from mode_ros.data.rosmsgs import make_typestore

        base = make_typestore()
        extra = {t.msgtype: t.msgdef for t in self.topics.values()
                 if t.msgdef and t.msgtype not in base.fielddefs}
        try:
            self.typestore = make_typestore(extra) if extra else base
        except Exception:  # noqa: BLE001
            self.typestore = base

    def _note_topic(self, topic: str, msgtype: str, msgdef: str = "") -> TopicInfo:
        ti = self.topics.get(topic)
        if ti is None:
            ti = self.topics[topic] = TopicInfo(topic, msgtype, 0, msgdef)
        return ti

    def _scan_file(self, f: Path) -> tuple[int, str]:
        """Salvage pre-scan: topics, counts, time range. Returns (messages, note)."""
        n = 0
        stop = ""
        it = _mcap_records(f) if f.suffix == ".mcap" else _sqlite_records(f, self._tmpdir())
        try:
            for kind, payload in it:
                if kind == "topic":
                    self._note_topic(*payload)
                elif kind == "msg":
                    topic, _msgtype, t, _raw = payload
                    self.topics[topic].count += 1
                    n += 1
                    self.start_ns = t if self.start_ns is None else min(self.start_ns, t)
                    self.end_ns = t if self.end_ns is None else max(self.end_ns, t)
                elif kind == "problem":
                    stop = payload
        except _Stop as exc:
            stop = str(exc)
        return n, (f"{n} messages" + (f", {stop}" if stop else ""))

    def _tmpdir(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="mode_ros_salvage_")
        return self._tmp

    # ---- read --------------------------------------------------------------------------------------
    def total(self, topics) -> int:
        return sum(self.topics[t].count for t in topics if t in self.topics)

    def messages(self, topics) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, msgtype, receive time ns, raw CDR) of the given topics, in receive-time order."""
        topics = set(topics)
        last_t = None
        n_at_last = 0
        if self._reader is not None:
            conns = [c for c in self._reader.connections if c.topic in topics]
            if not conns:
                return
            try:
                for conn, t, raw in self._reader.messages(connections=conns):
                    if t == last_t:
                        n_at_last += 1
                    else:
                        last_t, n_at_last = t, 1
                    yield conn.topic, conn.msgtype, int(t), raw
                return
            except Exception as exc:  # noqa: BLE001 - corrupt data part-way: salvage the rest
                self.read_errors += 1
                self.problems.append(f"bag {self.path}: read error after t={last_t} ns "
                                     f"({type(exc).__name__}: {exc}); continuing with the salvage reader")
                self._files = _storage_files(self.path)
        yield from self._salvage_messages(topics, last_t, n_at_last)

    def _salvage_messages(self, topics, skip_until, n_skip):
        heap: list = []
        seq = 0
        seen_at = 0
        for f in getattr(self, "_files", []):
            it = _mcap_records(f) if f.suffix == ".mcap" else _sqlite_records(f, self._tmpdir())
            try:
                for kind, payload in it:
                    if kind == "problem":
                        if payload not in " ".join(self.problems):
                            self.problems.append(f"{f.name}: {payload}")
                        continue
                    if kind != "msg":
                        continue
                    topic, msgtype, t, raw = payload
                    if topic not in topics:
                        continue
                    if skip_until is not None:
                        if t < skip_until:
                            continue
                        if t == skip_until and seen_at < n_skip:
                            seen_at += 1
                            continue
                    heapq.heappush(heap, (t, seq, topic, msgtype, raw))
                    seq += 1
                    if len(heap) > self.reorder:
                        t0, _, tp, mt, rw = heapq.heappop(heap)
                        yield tp, mt, t0, rw
            except _Stop as exc:
                if str(exc) not in " ".join(self.problems):
                    self.problems.append(f"{f.name}: {exc}")
        while heap:
            t0, _, tp, mt, rw = heapq.heappop(heap)
            yield tp, mt, t0, rw

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception:  # noqa: BLE001
                pass
            self._reader = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


class _Stop(Exception):
    """The salvage reader reached the unreadable part of a file (message says where and why)."""


# ---- MCAP salvage -----------------------------------------------------------------------------------
def _u16(b, o):
    return struct.unpack_from("<H", b, o)[0], o + 2


def _u32(b, o):
    return struct.unpack_from("<I", b, o)[0], o + 4


def _u64(b, o):
    return struct.unpack_from("<Q", b, o)[0], o + 8


def _str(b, o):
    n, o = _u32(b, o)
    return bytes(b[o:o + n]).decode("utf-8", "replace"), o + n


def _mcap_records(path: Path):
    """Yield ("topic", (topic, msgtype, msgdef)), ("msg", (topic, msgtype, t, raw)), ("problem", text)
    sequentially; raises _Stop at a truncated record."""
    with open(path, "rb") as fh:
        if fh.read(8) != MCAP_MAGIC:
            raise _Stop("not an MCAP file (bad magic)")
        yield from _McapSalvage(fh).records()


def _mcap_parse(buf, where: str):
    """(opcode, record body) of each record in ``buf``; _Stop at a truncated one."""
    o, end = 0, len(buf)
    while o < end:
        if end - o < 9:
            raise _Stop(f"truncated record header at {where}+{o}")
        op = buf[o]
        ln = struct.unpack_from("<Q", buf, o + 1)[0]
        o += 9
        if ln > end - o:
            raise _Stop(f"truncated at {where}+{o - 9}: record of {ln} bytes, {end - o} left")
        yield op, memoryview(buf)[o:o + ln]
        o += ln


class _McapSalvage:
    """The records of an MCAP file read front to back (no summary needed), so a file cut off by a crash
    gives every message before the cut: schemas and channels as they come, chunks decompressed one by one."""

    def __init__(self, fh):
        self.fh, self.size = fh, os.fstat(fh.fileno()).st_size
        self.schemas: dict[int, tuple[str, str]] = {}
        self.channels: dict[int, tuple[str, str]] = {}

    def records(self):
        fh = self.fh
        while True:
            pos = fh.tell()
            head = fh.read(9)
            if not head:
                raise _Stop(f"file ends at byte {pos} without a footer (truncated)")
            if len(head) < 9:
                raise _Stop(f"truncated record header at byte {pos}")
            op = head[0]
            ln = struct.unpack_from("<Q", head, 1)[0]
            if ln > self.size - pos - 9:
                why = f"truncated at byte {pos}: record of {ln} bytes, {self.size - pos - 9} left"
                if op == 0x06:  # a partial chunk: its complete records are readable if it is uncompressed
                    why += yield from self._partial_chunk(fh.read(), pos)
                raise _Stop(why)
            if op in (0x02, 0x0F):  # footer, or data end (the summary follows): nothing more to read
                return
            body = fh.read(ln)
            if op == 0x06:
                yield from self._chunk(body, pos)
            else:
                ev = self._handle(op, memoryview(body))
                if ev is not None:
                    yield ev

    def _records_in(self, data, where: str):
        for op, rec in _mcap_parse(data, where):
            ev = self._handle(op, rec)
            if ev is not None:
                yield ev

    def _chunk(self, body, pos: int):
        try:
            _s, p = _u64(body, 0)
            _e, p = _u64(body, p)
            usize, p = _u64(body, p)
            crc, p = _u32(body, p)
            comp, p = _str(body, p)
            clen, p = _u64(body, p)
            from rosbags.rosbag2.storage_mcap import decompress

            data = decompress(bytes(body[p:p + clen]), comp, usize, crc)
        except Exception as exc:  # noqa: BLE001 - a bad chunk is skipped, the file goes on
            yield ("problem", f"chunk at byte {pos} skipped ({type(exc).__name__}: {exc})")
            return
        try:
            yield from self._records_in(data, f"chunk@{pos}")
        except _Stop as exc:
            yield ("problem", f"chunk at byte {pos} damaged: {exc}")

    def _partial_chunk(self, body, pos: int):
        """The complete records of a chunk cut off by the end of the file (uncompressed chunks only);
        returns what to add to the truncation message."""
        try:
            p = 24
            _crc, p = _u32(body, p)
            comp, p = _str(body, p)
            _clen, p = _u64(body, p)
        except struct.error:
            return ""
        if comp != "":
            return ""
        try:
            yield from self._records_in(body[p:], f"partial chunk@{pos}")
        except _Stop:
            pass
        return " (complete messages of the partial chunk were read)"

    def _handle(self, op: int, rec):
        if op == 0x03:  # schema
            sid, p = _u16(rec, 0)
            name, p = _str(rec, p)
            _enc, p = _str(rec, p)
            dl, p = _u32(rec, p)
            self.schemas[sid] = (name, bytes(rec[p:p + dl]).decode("utf-8", "replace"))
        elif op == 0x04:  # channel
            cid, p = _u16(rec, 0)
            sid, p = _u16(rec, p)
            topic, p = _str(rec, p)
            name, msgdef = self.schemas.get(sid, ("", ""))
            self.channels[cid] = (topic, name)
            return ("topic", (topic, name, msgdef))
        elif op == 0x05:  # message
            cid, _ = _u16(rec, 0)
            t = struct.unpack_from("<Q", rec, 6)[0]
            ch = self.channels.get(cid)
            if ch is None:
                return ("problem", f"message on unknown channel {cid} skipped")
            return ("msg", (ch[0], ch[1], int(t), bytes(rec[22:])))
        return None


# ---- SQLite salvage ---------------------------------------------------------------------------------
def _sqlite_records(path: Path, tmpdir: str):
    """Copy the file with the header's page count fixed, read topics then messages by rowid."""
    with open(path, "rb") as fh:
        head = fh.read(100)
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        raise _Stop("not an SQLite database (bad header)")
    ps = struct.unpack_from(">H", head, 16)[0]
    ps = 65536 if ps == 1 else ps
    size = path.stat().st_size
    npages = size // ps
    fixed = Path(tmpdir) / (path.stem + ".salvage.db3")
    with open(path, "rb") as src, open(fixed, "wb") as dst:
        remaining = npages * ps
        while remaining > 0:
            buf = src.read(min(remaining, 1 << 22))
            if not buf:
                break
            dst.write(buf)
            remaining -= len(buf)
    with open(fixed, "r+b") as fh:
        fh.seek(28)
        fh.write(struct.pack(">I", npages))
    con = sqlite3.connect(f"file:{fixed}?mode=ro", uri=True)
    try:
        try:
            rows = con.execute("SELECT id, name, type FROM topics").fetchall()
        except sqlite3.DatabaseError as exc:
            raise _Stop(f"topics table unreadable ({exc})") from None
        msgdefs = {}
        try:
            for topic_type, enc, text in con.execute(
                    "SELECT topic_type, encoding, encoded_message_definition FROM message_definitions"):
                if enc == "ros2msg":
                    msgdefs[topic_type] = text
        except sqlite3.DatabaseError:
            pass
        tmap = {}
        for tid, name, typ in rows:
            tmap[tid] = (name, typ)
            yield ("topic", (name, typ, msgdefs.get(typ, "")))
        n = 0
        try:
            for _rid, tid, t, data in con.execute("SELECT id, topic_id, timestamp, data FROM messages ORDER BY rowid"):
                tp = tmap.get(tid)
                if tp is None:
                    continue
                n += 1
                yield ("msg", (tp[0], tp[1], int(t), bytes(data)))
        except sqlite3.DatabaseError as exc:
            raise _Stop(f"unreadable after {n} messages ({exc})") from None
    finally:
        con.close()
        try:
            fixed.unlink()
        except OSError:
            pass
