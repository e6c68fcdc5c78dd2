#!/bin/sh
# Ready when both plugin servers listen on their sockets and Kong's status API says the node is
# ready (configuration loaded, workers up): GET /status/ready on status_listen, 127.0.0.1:8007 by
# default (Kong@3.9.x:kong/status/ready.lua). The image has no curl; python3 it has.
set -e
test -S /usr/local/kong/token-meter.socket
test -S /usr/local/kong/token-meter-log.socket
exec python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:8007/status/ready", timeout=3)'
