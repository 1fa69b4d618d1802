"""Thin stand-ins for the live intensity APIs, on loopback: each answers with a payload shaped
like the provider's documented response, and can be told to fail (auth, 429, slow, malformed).

* Electricity Maps v3: ``GET /v3/carbon-intensity/{latest,history,forecast}?zone=``, header
  ``auth-token``; replies ``{zone, carbonIntensity, datetime, updatedAt, createdAt,
  emissionFactorType, isEstimated, estimationMethod}``, ``{zone, history: [...]}``,
  ``{zone, forecast: [{carbonIntensity, datetime}], updatedAt}``; 401 without a valid token.
* WattTime v3: ``GET /login`` (basic auth) -> ``{"token": ...}``; ``GET /v3/forecast`` and
  ``/v3/historical`` (bearer) -> ``{data: [{point_time, value}], meta: {region, signal_type,
  units: "lbs_co2_per_mwh", data_point_period_seconds, generated_at, ...}}``.
* GB Carbon Intensity: ``/intensity``, ``/intensity/{from}/{to}``, ``/intensity/{from}/fw48h``
  -> ``{data: [{from, to, intensity: {forecast, actual, index}}]}``;
  ``/regional/postcode/{pc}`` -> ``{data: [{regionid, dnoregion, shortname, postcode,
  data: [{from, to, intensity: {forecast, index}, generationmix: [...]}]}]}``;
  ``/regional/intensity/{from}/fw48h/postcode/{pc}`` -> ``{data: {regionid, ..., data: [...]}}``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

EM_TOKEN = "em-secret-token-123"
WT_USER, WT_PASS, WT_TOKEN = "wt-user", "wt-pass-456", "wt-bearer-789"


def _hour(dt: datetime) -> datetime:
    return dt.replace(minute=0, second=0, microsecond=0)


def _z(dt: datetime, ms: bool = True) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z" if ms else "%Y-%m-%dT%H:%MZ")


class Fake:
    """State shared with the handler: ``mode`` = ok | auth | ratelimit | slow | malformed | html | hold
    (``hold``: each request waits until ``gate`` is set, then is answered as ``ok``)."""

    def __init__(self, kind: str) -> None:
        self.kind, self.mode, self.hits, self.paths = kind, "ok", 0, []
        self.retry_after = "2"
        self.gate = threading.Event()
        self.value = 123.0  # EM and GB: gCO2e/kWh; WattTime: lbs/MWh
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Fake":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()  # let any held request go
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body, headers: dict | None = None) -> None:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):  # noqa: N802
                fake.hits += 1
                fake.paths.append(self.path)
                if fake.mode == "slow":
                    time.sleep(1.5)
                if fake.mode == "hold":
                    fake.gate.wait(30)
                if fake.mode == "ratelimit":
                    return self._send(429, {"message": "Too many requests"}, {"Retry-After": fake.retry_after})
                if fake.mode == "malformed":
                    return self._send(200, b'{"zone": "DE", "carbonIntensity": ')
                if fake.mode == "html":
                    return self._send(502, b"<html>bad gateway</html>")
                getattr(self, "_" + fake.kind)()

            # ---- Electricity Maps v3
            def _em(self):
                u = urlsplit(self.path)
                q = parse_qs(u.query)
                if self.headers.get("auth-token") != EM_TOKEN or fake.mode == "auth":
                    return self._send(401, {"status": "error", "message": "Invalid auth-token"})
                zone = q.get("zone", [""])[0]
                if zone not in ("DE", "FR", "GB", "US-CAL-CISO"):
                    return self._send(400, {"status": "error", "message": f"Zone '{zone}' does not exist."})
                factor = q.get("emissionFactorType", ["lifecycle"])[0]
                now = _hour(datetime.now(timezone.utc))

                def entry(dt, v):
                    return {"zone": zone, "carbonIntensity": v, "datetime": _z(dt), "updatedAt": _z(now), "createdAt": _z(dt),
                            "emissionFactorType": factor, "isEstimated": False, "estimationMethod": None}

                if u.path == "/v3/carbon-intensity/latest":
                    return self._send(200, entry(now, fake.value))
                if u.path == "/v3/carbon-intensity/history":
                    return self._send(200, {"zone": zone, "history": [entry(now - timedelta(hours=24 - i), fake.value + i) for i in range(24)]})
                if u.path == "/v3/carbon-intensity/forecast":
                    return self._send(200, {"zone": zone, "forecast": [{"carbonIntensity": fake.value + 100 - 10 * (i % 10), "datetime": _z(now + timedelta(hours=i))} for i in range(24)],
                                            "updatedAt": _z(now)})
                return self._send(404, {"status": "error", "message": "not found"})

            # ---- WattTime v3
            def _wt(self):
                u = urlsplit(self.path)
                q = parse_qs(u.query)
                if u.path == "/login":
                    expect = "Basic " + base64.b64encode(f"{WT_USER}:{WT_PASS}".encode()).decode()
                    if self.headers.get("Authorization") != expect:
                        return self._send(403, {"error": "Unauthorized"})
                    return self._send(200, {"token": WT_TOKEN})
                if self.headers.get("Authorization") != f"Bearer {WT_TOKEN}" or fake.mode == "auth":
                    return self._send(401, {"error": "Unauthorized"})
                region = q.get("region", [""])[0]
                meta = {"data_point_period_seconds": 300, "region": region, "signal_type": q.get("signal_type", ["co2_moer"])[0],
                        "units": "lbs_co2_per_mwh", "warnings": [], "model": {"date": "2023-03-01", "type": "binned_regression"}}
                if u.path == "/v3/forecast":
                    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
                    now -= timedelta(minutes=now.minute % 5)
                    meta.update(generated_at=now.isoformat(), generated_at_period_seconds=300)
                    return self._send(200, {"data": [{"point_time": (now + timedelta(minutes=5 * i)).isoformat(), "value": fake.value + i} for i in range(288)], "meta": meta})
                if u.path == "/v3/historical":
                    start = datetime.fromisoformat(q["start"][0].replace("Z", "+00:00"))
                    return self._send(200, {"data": [{"point_time": (start + timedelta(minutes=5 * i)).isoformat(), "value": fake.value} for i in range(12)], "meta": meta})
                return self._send(404, {"error": "not found"})

            # ---- GB Carbon Intensity API
            def _gb(self):
                parts = urlsplit(self.path).path.strip("/").split("/")
                now = datetime.now(timezone.utc)
                now = now.replace(minute=30 if now.minute >= 30 else 0, second=0, microsecond=0)

                def period(dt, v, actual=True, mix=False):
                    p = {"from": _z(dt, False), "to": _z(dt + timedelta(minutes=30), False),
                         "intensity": {"forecast": v + 5, "actual": v if actual else None, "index": "moderate"}}
                    if mix:
                        p["intensity"].pop("actual")
                        p["generationmix"] = [{"fuel": "gas", "perc": 40.1}, {"fuel": "wind", "perc": 30.2}]
                    return p

                v = int(fake.value)
                if parts == ["intensity"]:
                    return self._send(200, {"data": [period(now, v)]})
                if parts[0] == "intensity" and len(parts) == 3 and parts[2] == "fw48h":
                    t0 = datetime.fromisoformat(parts[1].replace("Z", "+00:00"))
                    return self._send(200, {"data": [period(t0 + timedelta(minutes=30 * i), v + (i % 6) * 10, actual=False) for i in range(96)]})
                if parts[0] == "intensity" and len(parts) == 3:
                    t0 = datetime.fromisoformat(parts[1].replace("Z", "+00:00"))
                    return self._send(200, {"data": [period(t0, v)]})
                if parts[:2] == ["regional", "postcode"]:
                    return self._send(200, {"data": [{"regionid": 12, "dnoregion": "SSE South", "shortname": "South England", "postcode": parts[2],
                                                      "data": [period(now, v - 20, mix=True)]}]})
                if parts[:2] == ["regional", "intensity"] and parts[3:5] == ["fw48h", "postcode"]:
                    t0 = datetime.fromisoformat(parts[2].replace("Z", "+00:00"))
                    return self._send(200, {"data": {"regionid": 12, "dnoregion": "SSE South", "shortname": "South England", "postcode": parts[5],
                                                     "data": [period(t0 + timedelta(minutes=30 * i), v - 20 + i % 4, mix=True) for i in range(96)]}})
                return self._send(400, {"error": {"code": "400 Bad Request", "message": "Please enter a valid URL."}})

        return H
