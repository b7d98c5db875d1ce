#!/usr/bin/python3
"""A real RTSP server for tests and demos: GStreamer's gst-rtsp-server (Debian
packages gir1.2-gst-rtsp-server-1.0, gstreamer1.0-rtsp, python3-gi and the
gstreamer1.0-plugins-*), serving H.264 MP4 clips without re-encoding.

Run it with the *system* python (python3-gi is not in the virtual environment)::

    /usr/bin/python3 tests/rtsp_server.py --port 8554 cam=/path/clip.mp4 [more=/path/other.mp4]

Each ``name=path`` is served at ``rtsp://127.0.0.1:PORT/name``, paced in real
time like a camera; every client gets its own session from the clip's start,
and the session ends with the clip. ``--user``/``--password`` turn on basic
authentication. The server prints ``READY`` once it listens.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def launch_line(path: str) -> str:
    # qtdemux/h264parse repackage the H.264 without decoding; SPS/PPS go in-band for late joiners
    return f'( filesrc location="{path}" ! qtdemux ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )'


def build_server(port: int, mounts: dict[str, str], user: str | None, password: str | None):
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    for name, path in mounts.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch_line(path))
        factory.set_shared(False)
        if user:
            permissions = GstRtspServer.RTSPPermissions()
            permissions.add_permission_for_role("viewer", "media.factory.access", True)
            permissions.add_permission_for_role("viewer", "media.factory.construct", True)
            factory.set_permissions(permissions)
        server.get_mount_points().add_factory(f"/{name}", factory)
    if user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password or ""), token)
        server.set_auth(auth)
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("mounts", nargs="+", metavar="NAME=PATH")
    args = parser.parse_args()
    Gst.init(None)
    mounts = dict(item.split("=", 1) for item in args.mounts)
    server = build_server(args.port, mounts, args.user, args.password)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    main_loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, main_loop.quit)
    print("READY", flush=True)
    main_loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
