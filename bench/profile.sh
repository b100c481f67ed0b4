#!/bin/bash
# CPU per request and an optional py-spy profile of one relay under wrk (bench/README.md,
# "Profiling"). The relay on CPU 0, wrk and the sink on CPU 1; prints wrk's rate and each
# thread's CPU ticks (1/100 s) over 8 s of a 12 s run; with PROFILE=1 also writes collapsed
# stacks to var/prof/NAME.raw (py-spy in the venv: .venv/bin/pip install py-spy).
#   bench/profile.sh NAME [paused|live] [type1.lua|type1x10.lua|type2.lua]
#   MAXP=2000 bench/profile.sh pipe live      # the pipeline, outbox capped as make bench does
set -e
cd "$(dirname "$0")/.."; mkdir -p var/prof
NAME=$1; MODE=${2:-paused}; SCRIPT=${3:-type1.lua}
W=var/prof/w; mkdir -p $W; rm -f $W/o.db*
# ports the OS hands out, never fixed ones; every child stopped however the script ends
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port); SINK=$(free_port)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
cat > $W/relay.toml <<T
log_level = "info"
[server]
listen = "127.0.0.1:$PORT"
tokens = ["bench-token-7d1e"]
[queue]
path = "$PWD/$W/o.db"
max_pending = ${MAXP:-1000000}
ttl = "1d"
[[providers]]
name = "sink"
type = "http"
url = "http://127.0.0.1:$SINK/send"
body = { to = "{to}", text = "{message}", ref = "{id}" }
concurrency = 64
timeout = "5s"
[routes]
sms = ["sink"]
voice = ["sink"]
T
taskset -c 1 .venv/bin/python bench/sink.py --port $SINK >/dev/null 2>&1 & SP=$!
ARGS=""; [ "$MODE" = paused ] && ARGS="--pause-delivery"
taskset -c 0 .venv/bin/python -m hapsms_relay serve --config $W/relay.toml $ARGS > $W/relay.log 2>&1 & RP=$!
for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:$PORT/healthz && break; sleep 0.1; done
export HAPSMS_TOKEN=bench-token-7d1e
[ "$MODE" = live ] && export HAPSMS_BACKOFF=1
taskset -c 1 wrk -t1 -c64 -d2s -s bench/wrk/$SCRIPT http://127.0.0.1:$PORT/sms/webhook > /dev/null
taskset -c 1 wrk -t1 -c64 -d12s -s bench/wrk/$SCRIPT http://127.0.0.1:$PORT/sms/webhook > $W/wrk.txt &
WP=$!
sleep 1
# CPU per thread over 8s
python3 - $RP <<'P' > var/prof/$NAME.cpu &
import os,sys,time
pid=sys.argv[1]
def snap():
    d={}
    for t in os.listdir(f"/proc/{pid}/task"):
        f=open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")",1)[1].split()
        name=open(f"/proc/{pid}/task/{t}/comm").read().strip()
        d[t]=(name,int(f[11])+int(f[12]))
    return d
a=snap(); time.sleep(8); b=snap()
for t,(n,v) in b.items():
    print(n, t, (v-a.get(t,(n,0))[1]))
P
CP=$!
if [ -n "$PROFILE" ]; then .venv/bin/py-spy record -p $RP -d 8 -r 200 -f raw -o var/prof/$NAME.raw ${NATIVE:+--native} >/dev/null 2>&1 || true; fi
wait $CP; wait $WP
grep -E "Requests/sec|Non-2xx" $W/wrk.txt
cat var/prof/$NAME.cpu
if [ "$MODE" = live ]; then curl -s http://127.0.0.1:$SINK/stats; echo; fi
kill $RP; wait $RP || true; kill $SP; wait $SP 2>/dev/null || true
