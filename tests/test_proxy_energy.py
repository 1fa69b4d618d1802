"""The proxy as a product: energy back to the caller, the ledger, labels, response headers.

Real uvicorn servers over loopback (the upstream answers like vLLM's OpenAI server,
see tests/test_openai_proxy.py), httpx clients, a live meter on a known power trace.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat

import httpx
import numpy as np
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from wattspan import StepModel
from wattspan.meter.provisional import Provisional
from wattspan.integrations.openai_proxy import _splice_usage, create_proxy

from .conftest import serve
from .test_openai_proxy import chat_body, make_upstream, records, stack, strip_energy


def _events(raw: bytes) -> list:
    out = []
    for ev in raw.split(b"\n\n"):
        if ev.startswith(b"data: {"):
            out.append(json.loads(ev[6:]))
    return out


class TestEnergyInUsage:
    def test_non_streamed_usage_carries_a_provisional_figure_and_the_final_one_is_retrievable(self, live_meter):
        with stack(live_meter) as (up, proxy, url, up_url):
            first = httpx.post(f"{url}/v1/chat/completions", json=chat_body())
            assert live_meter.flush(10)
            # the meter now knows this device's recent joules per token: the next figure is a number
            second = httpx.post(f"{url}/v1/chat/completions", json=chat_body(max_tokens=8))
            rid = second.headers["x-wattspan-request-id"]
            u1, u2 = first.json()["usage"], second.json()["usage"]
            assert u1["energy_details"]["method"] == "none" and u1["energy_j"] is None  # nothing known yet
            assert u2["energy_details"]["method"] == "recent-rate"
            assert u2["energy_j"] > 0 and u2["co2e_g"] > 0
            # the OpenAI fields are untouched
            assert (u2["prompt_tokens"], u2["completion_tokens"]) == (5, 8)
            pending = httpx.get(f"{url}/wattspan/requests/{rid}")
            assert pending.status_code in (200, 202)
            assert pending.json()["provisional"]["energy_j"] == u2["energy_j"]
            recs = records(live_meter, 2)
            final = httpx.get(f"{url}/wattspan/requests/{rid}")
            unknown = httpx.get(f"{url}/wattspan/requests/ffffffff00000000")
            hostile = httpx.get(f"{url}/wattspan/requests/..%2F..%2Fetc")
        assert final.status_code == 200 and unknown.status_code == 404 and hostile.status_code == 404
        f = final.json()
        rec = next(r for r in recs if r.id == rid)
        assert f["status"] == "final" and f["energy_j"] == rec.energy_j and f["co2e_g"] == rec.co2e_g
        assert (f["prompt_tokens"], f["output_tokens"], f["method"]) == (5, 8, rec.method)
        assert "tenant" not in f and "trace_id" not in f  # one caller's id does not tell another's labels
        # 100 W on a 40 W idle, one request at a time: its figure is its lifetime times 100 W, near enough
        assert f["energy_j"] == pytest.approx(100.0 * f["duration_s"], rel=0.05)
        # the provisional figure is the rate of the first request times this one's tokens
        r1 = next(r for r in recs if r.id != rid)
        assert u2["energy_j"] == pytest.approx(r1.energy_j / (r1.prompt_tokens + r1.output_tokens) * 13, rel=1e-5)

    def test_a_request_s_figures_are_read_back_by_its_own_tenant_only(self, live_meter):
        mine, theirs = {"authorization": "Bearer sk-mine-0123456789"}, {"authorization": "Bearer sk-theirs-9876543210"}
        with stack(live_meter) as (up, proxy, url, up_url):
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers=mine)
            assert live_meter.flush(10)
            r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(max_tokens=8), headers=mine)
            rid = r.headers["x-wattspan-request-id"]
            pending_other = httpx.get(f"{url}/wattspan/requests/{rid}", headers=theirs)
            records(live_meter, 2)
            own = httpx.get(f"{url}/wattspan/requests/{rid}", headers=mine)
            other = httpx.get(f"{url}/wattspan/requests/{rid}", headers=theirs)
            anonymous = httpx.get(f"{url}/wattspan/requests/{rid}")
        assert own.status_code == 200 and own.json()["status"] == "final" and "_owner" not in own.json().get("provisional", {})
        # ids are sequential: another caller must not read this one's model, tokens or energy by counting
        assert pending_other.status_code == other.status_code == anonymous.status_code == 404

    def test_a_tenant_header_cannot_pose_as_an_api_key_s_pseudonym(self, live_meter):
        # the pseudonym shows up in reports and dashboards: a caller who copies it into x-tenant-id must be
        # neither billed as that key's tenant nor able to read its requests back
        victim = {"authorization": "Bearer sk-victim-0123456789"}
        with stack(live_meter, pseudonym_key=SECRET) as (up, proxy, url, up_url):
            forged = {"x-tenant-id": pseudonym("sk-victim-0123456789")}
            r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers=victim)
            rid = r.headers["x-wattspan-request-id"]
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={**forged, "x-test": "forged"})
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"x-tenant-id": forged["x-tenant-id"].upper() + "!"})
            recs = records(live_meter, 3)
            stolen = httpx.get(f"{url}/wattspan/requests/{rid}", headers=forged)
            own = httpx.get(f"{url}/wattspan/requests/{rid}", headers=victim)
        assert own.status_code == 200 and stolen.status_code == 404
        tenants = sorted(rec.tenant for rec in recs)
        assert tenants.count(forged["x-tenant-id"]) == 1  # the victim's own request only
        assert "header:" + forged["x-tenant-id"] in tenants and proxy.stats["tenant_renamed"] == 3  # once per request (two posts, one read), however often asked
        # with no pseudonyms (tenant_from_key off) there is nothing to pose as: the header is kept as sent
        from wattspan.integrations.openai_proxy import _tenant_label

        assert _tenant_label(b"x-tenant-id", False)({"headers": [(b"x-tenant-id", forged["x-tenant-id"].encode())]}) == forged["x-tenant-id"]

    def test_streams_get_it_only_when_they_asked_for_usage(self, live_meter):
        with stack(live_meter) as (up, proxy, url, up_url):
            httpx.post(f"{url}/v1/chat/completions", json=chat_body())
            assert live_meter.flush(10)
            asked = httpx.post(f"{url}/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}))
            plain = httpx.post(f"{url}/v1/chat/completions", json=chat_body(stream=True))
            rid = plain.headers["x-wattspan-request-id"]
            direct = httpx.post(f"{up_url}/v1/chat/completions", json=chat_body(stream=True), headers={"x-request-id": rid})
            kept = httpx.get(f"{url}/wattspan/requests/{rid}")
        usage = _events(asked.content)[-1]["usage"]
        assert usage["energy_j"] > 0 and usage["energy_details"]["provisional"] is True
        assert usage["energy_details"]["request_id"] == asked.headers["x-wattspan-request-id"]
        # the client that did not ask gets exactly the upstream's stream; its figure is kept for GET
        assert plain.content == direct.content
        assert kept.status_code in (200, 202) and kept.json()["provisional"]["energy_j"] > 0
        assert proxy.stats["energy_annotated"] == 2

    def test_off_switches(self, live_meter):
        with stack(live_meter, usage_energy=False, records_endpoint=False, request_id_header=None) as (up, proxy, url, up_url):
            r = httpx.post(f"{url}/v1/chat/completions", json=chat_body())
            direct = httpx.post(f"{up_url}/v1/chat/completions", json=chat_body(), headers={"x-request-id": up.state.seen[-1]["headers"]["x-request-id"]})
            assert httpx.get(f"{url}/wattspan/requests/x").status_code == 404
        assert r.content == direct.content and "x-wattspan-request-id" not in r.headers

    def test_error_responses_are_not_touched(self, live_meter):
        up = make_upstream()

        @up.post("/v1/fake/error")
        async def error():
            return JSONResponse({"error": {"message": "bad"}, "usage": {"prompt_tokens": 1}}, status_code=400)

        with serve(up) as up_url:
            with serve(create_proxy(up_url, meter=live_meter)) as url:
                r = httpx.post(f"{url}/v1/fake/error", json={})
        assert r.status_code == 400 and b"energy" not in r.content


def test_splice_keeps_every_other_byte():
    raw = b'{"id":"x","choices":[{"text":"\\"usage\\": {not me}"}],"usage":{"prompt_tokens":3,"details":{"a":1}} }'
    out = _splice_usage(raw, {"energy_j": 1.5})
    assert out == raw.replace(b'{"a":1}}', b'{"a":1},"energy_j":1.5}')
    assert json.loads(out)["usage"]["energy_j"] == 1.5
    assert _splice_usage(b'{"usage":{}}', {"e": 1}) == b'{"usage":{"e":1}}'
    assert _splice_usage(b'{"choices":[]}', {"e": 1}) is None
    assert _splice_usage(b'{"usage": null}', {"e": 1}) is None
    assert _splice_usage(b'{"usage":{"a":', {"e": 1}) is None
    # a nested "usage" object after the top-level one is not mistaken for it: then nothing is added
    odd = b'{"usage":{"prompt_tokens":1},"choices":[{"usage":{"x":2}}]}'
    assert _splice_usage(odd, {"e": 1}, {"prompt_tokens": 1}) is None
    assert _splice_usage(raw, {"e": 1}, {"prompt_tokens": 3, "details": {"a": 1}}) is not None


class _FakeMeter:
    """What Provisional reads from a Meter: its fitted step models, idle and carbon."""

    def __init__(self, coef, idle_w):
        from wattspan.carbon import CarbonModel

        self._models = {"gpu0": StepModel(coef=np.asarray(coef, float), r2=1.0, rows=100)}
        self.idle_w = idle_w
        self._idle = {}
        self.carbon = CarbonModel(intensity_g_per_kwh=360.0)


def test_provisional_step_model_splits_steps_by_tokens_and_scales_the_missing_decode_steps():
    # coef: W (duration), J per prefill token, J per decode token, J per decode ktoken of context
    coef = [50.0, 0.01, 0.2, 0.5]
    p = Provisional(_FakeMeter(coef, idle_w=30.0))
    p.open("a")
    p.open("b")
    s = 1_000_000_000
    # step 1: a's prefill (100 tokens) with b and another request decoding
    p.observe_step(0, s // 10, "gpu0", {"a": 100, "b": 1, "other": 1})
    # steps 2, 3: a decodes; b decodes once more
    p.observe_step(s // 10, s // 5, "gpu0", {"a": 1, "b": 1})
    p.observe_step(s // 5, 3 * s // 10, "gpu0", {"a": 1})
    # features (as attribution.step_features makes them): duration, prefill tokens, decode tokens, and the
    # decode entries' context (tokens of earlier steps + this one) in ktokens. Step 1: b and "other" are new.
    x1 = np.array([0.1, 100, 2, (0 + 1 + 0 + 1) / 1000])
    x2 = np.array([0.1, 0, 2, (100 + 1 + 1 + 1) / 1000])
    x3 = np.array([0.1, 0, 1, (101 + 1) / 1000])
    c = np.array(coef)
    a_dyn_pre = (c @ x1) * 100 / 102
    a_dec = (c @ x2) * 1 / 2 + (c @ x3)
    # a reported 5 output tokens: 1 from the prefill step, 4 decode of which 2 seen -> decode phase x2
    est = p.estimate("a", "gpu0", prompt_tokens=100, output_tokens=5)
    idle_s = 0.1 / 3 + 2 * (0.1 / 2 + 0.1)
    assert est["method"] == "step-model" and est["steps"] == 3
    assert est["energy_j"] == pytest.approx(a_dyn_pre + 2 * a_dec + 30.0 * idle_s, rel=1e-9)
    assert est["co2e_g"] == pytest.approx(est["energy_j"] / 3.6e6 * 360.0, rel=1e-9)
    # estimating forgets the request; a step naming it later is ignored; a request never opened is not tallied
    assert p.estimate("a", "gpu0", 100, 5)["method"] == "none"
    p.observe_step(0, s, "gpu0", {"a": 1})
    assert "a" not in p._tally and "other" not in p._tally
    assert p.estimate("b", "gpu0", 10, 2)["method"] == "step-model"


def test_provisional_prices_every_term_of_the_fitted_family_and_each_gpu_of_a_group():
    """A 'power', 'saturating' or knees family's terms (basis 4..12) count, and a group is priced on each member."""
    from wattspan.attribution.family import BASIS, basis

    coef = np.zeros(len(BASIS))
    coef[[0, 5, 7, 10]] = (40.0, 3.0, 20.0, 0.5)  # W; W per decode token; W at saturation; W per token of work to a knee
    rates = (50.0, 200.0, 4.0, 1.0, 3.0, 8.0, 20.0)  # throughputs; the knees' decode weight and work
    meter = _FakeMeter(coef, idle_w=10.0)
    meter._models = {g: StepModel(coef=coef, r2=1.0, rows=100, family="all", rates=rates) for g in ("gpu0", "gpu1")}
    p = Provisional(meter)
    s = 1_000_000_000
    for dev in ("gpu0", "gpu0,gpu1"):
        p.open("a")
        p.observe_step(0, s // 10, dev, {"a": 1, "b": 1})  # a decodes beside b
        one = p.estimate("a", dev, prompt_tokens=1, output_tokens=None)
        x, _ = basis(np.array([[0.1, 0.0, 2.0, 2 / 1000]]), rates)
        n = dev.count(",") + 1
        assert one["method"] == "step-model"
        assert one["energy_j"] == pytest.approx(n * (float(x[0] @ coef) / 2 + 10.0 * 0.1 / 2), rel=1e-9)


def test_steps_seen_before_the_first_model_are_priced_by_it_only_without_saturating_terms():
    """A saturating term needs the model's throughputs when the step is seen: a request whose steps
    began before the device had a model gets the recent rate (here: none yet) from such a model."""
    s = 1_000_000_000
    meter = _FakeMeter([40.0, 0.0, 0.0, 0.0], idle_w=10.0)
    meter._models = {}
    p = Provisional(meter)
    for r in ("a", "b", "c"):
        p.open(r)
    p.observe_step(0, s // 10, "gpu0", {"a": 1, "b": 1})  # no model yet
    sat = np.zeros(9)
    sat[[0, 8]] = (40.0, 20.0)
    meter._models = {"gpu0": StepModel(coef=sat, r2=1.0, rows=100, family="saturating", rates=(50.0, 200.0))}
    p.observe_step(s // 10, s // 5, "gpu0", {"a": 1, "b": 1, "c": 1})
    assert p.estimate("a", "gpu0", 1, 2)["method"] == "none"
    assert p.estimate("c", "gpu0", 1, 1)["method"] == "step-model"  # all its steps seen with the model
    # a model without saturating terms prices them exactly: b's share of each step (1/2, 1/3) at 40 W + 10 W idle
    meter._models = {"gpu0": StepModel(coef=np.array([40.0, 0.0, 0.0, 0.0]), r2=1.0, rows=100)}
    b = p.estimate("b", "gpu0", 1, 2)
    assert b["method"] == "step-model" and b["energy_j"] == pytest.approx((40.0 + 10.0) * (0.1 / 2 + 0.1 / 3), rel=1e-9)


SECRET = b"s" * 32


def pseudonym(api_key: str | bytes, secret: bytes = SECRET) -> str:
    raw = api_key.encode() if isinstance(api_key, str) else api_key
    return "key-" + hmac.new(secret, b"wattspan-tenant\0" + raw, hashlib.sha256).hexdigest()[:12]


def test_an_empty_tenant_header_falls_back_to_the_api_key():
    from wattspan.integrations.openai_proxy import _tenant_label

    tenant = _tenant_label(b"x-tenant-id", True, SECRET)
    keyed = pseudonym("k1")
    assert tenant({"headers": [(b"x-tenant-id", b" "), (b"authorization", b"Bearer k1")]}) == keyed
    assert tenant({"headers": [(b"authorization", b"Bearer k1"), (b"x-tenant-id", b"acme")]}) == "acme"
    assert tenant({"headers": [(b"x-tenant-id", b"")]}) == ""


class TestPseudonymKey:
    """The API-key pseudonym is keyed (HMAC-SHA-256): no one can recompute it from a guessed key, and two
    deployments' pseudonyms of one key do not match; the secret itself never leaves the process or its key file."""

    HEADERS = {"headers": [(b"authorization", b"Bearer sk-guessable")]}

    def label(self, proxy) -> str:
        return proxy.tenant_of(self.HEADERS)

    def test_not_the_unkeyed_hash_and_one_per_secret(self, monkeypatch):
        monkeypatch.delenv("WATTSPAN_PSEUDONYM_KEY", raising=False)
        unkeyed = "key-" + hashlib.sha256(b"wattspan-tenant\0sk-guessable").hexdigest()[:12]
        a, b = (create_proxy("http://127.0.0.1:9", pseudonym_key=k) for k in (b"a" * 32, b"b" * 32))
        assert self.label(a) == pseudonym("sk-guessable", b"a" * 32) != unkeyed
        assert self.label(a) != self.label(b)
        assert self.label(a) == self.label(create_proxy("http://127.0.0.1:9", pseudonym_key="a" * 32))
        with pytest.raises(ValueError, match="32 bytes"):
            create_proxy("http://127.0.0.1:9", pseudonym_key=b"short")

    def test_from_the_environment(self, monkeypatch):
        monkeypatch.setenv("WATTSPAN_PSEUDONYM_KEY", "e" * 40)
        p = create_proxy("http://127.0.0.1:9")
        assert p.pseudonym_source == "WATTSPAN_PSEUDONYM_KEY" and self.label(p) == pseudonym("sk-guessable", b"e" * 40)

    def test_without_a_ledger_the_key_is_the_processes_own(self, monkeypatch):
        monkeypatch.delenv("WATTSPAN_PSEUDONYM_KEY", raising=False)
        a, b = create_proxy("http://127.0.0.1:9"), create_proxy("http://127.0.0.1:9")
        assert a.pseudonym_source == "process" and self.label(a) != self.label(b)
        off = create_proxy("http://127.0.0.1:9", tenant_from_key=False)
        assert off.pseudonym_source == "off" and self.label(off) == ""

    def test_a_key_file_beside_the_ledger_keeps_pseudonyms_across_restarts(self, monkeypatch, tmp_path, caplog):
        monkeypatch.delenv("WATTSPAN_PSEUDONYM_KEY", raising=False)
        db = tmp_path / "sub" / "proxy.sqlite"
        first = create_proxy("http://127.0.0.1:9", ledger=db)
        label = self.label(first)
        first._flush_ledger()
        kf = tmp_path / "sub" / "proxy.sqlite.pseudonym-key"
        assert first.pseudonym_source == "key-file" and stat.S_IMODE(os.stat(kf).st_mode) == 0o600
        secret = bytes.fromhex(kf.read_text().strip())
        assert len(secret) == 32 and label == pseudonym("sk-guessable", secret)
        again = create_proxy("http://127.0.0.1:9", ledger=db)  # a restart
        assert self.label(again) == label
        again._flush_ledger()
        assert kf.read_text().strip() not in caplog.text and secret.hex() not in repr(vars(again))
        kf.write_text("not hex\n")
        broken = create_proxy("http://127.0.0.1:9", ledger=db)  # a damaged file: logged, a key of this process
        broken._flush_ledger()
        assert broken.pseudonym_source == "process" and "pseudonym key file" in caplog.text


def test_provisional_memory_is_bounded():
    p = Provisional(_FakeMeter([1, 0, 0, 0], 0.0), max_requests=100)
    for i in range(1000):
        p.open(f"r{i}")
    assert len(p._tally) == 100 and p.stats["evicted"] == 900 and "r999" in p._tally


class TestLedgerAndReport:
    def test_db_ledger_report_and_report_id(self, live_meter, tmp_path, capsys):
        from wattspan.cli import main

        db = tmp_path / "proxy.sqlite"
        with stack(live_meter, ledger=db) as (up, proxy, url, up_url):
            ids = []
            for tenant in ("acme", "acme", "globex"):
                r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"x-tenant-id": tenant})
                ids.append(r.headers["x-wattspan-request-id"])
            assert live_meter.flush(10) and proxy.ledger.flush(10)
            proxy._final.clear()  # older than the proxy remembers: the figure comes from the ledger
            from_ledger = httpx.get(f"{url}/wattspan/requests/{ids[2]}", headers={"x-tenant-id": "globex"})  # its own tenant
        assert from_ledger.status_code == 200 and from_ledger.json()["energy_j"] > 0
        assert main(["report", "--db", str(db), "--by", "tenant", "--format", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        by = {r["tenant"]: r for r in (rows if isinstance(rows, list) else rows["rows"])}
        assert by["acme"]["requests"] == 2 and by["globex"]["requests"] == 1
        assert main(["report", "--db", str(db), "--id", ids[0], "--format", "json"]) == 0
        one = json.loads(capsys.readouterr().out)
        assert one["id"] == ids[0] and one["tenant"] == "acme" and one["energy_j"] > 0
        assert main(["report", "--db", str(db), "--id", "nope"]) == 1

    def test_a_tenant_whose_label_cleaning_changes_is_owned_apart_after_a_restart(self, live_meter, tmp_path):
        # "acme corp" was kept as "acmecorp": once the record was only in the ledger (a restart, or older than the
        # proxy remembers), the tenant "acmecorp" read it and its owner could not
        db = tmp_path / "proxy.sqlite"
        with stack(live_meter, ledger=db) as (up, proxy, url, up_url):
            r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"x-tenant-id": "acme corp"})
            rid = r.headers["x-wattspan-request-id"]
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"x-tenant-id": "acmecorp"})
            assert live_meter.flush(10) and proxy.ledger.flush(10)
            proxy._final.clear()
            proxy._owners.clear()  # as after a restart: the owner is known from the ledger only
            other = httpx.get(f"{url}/wattspan/requests/{rid}", headers={"x-tenant-id": "acmecorp"})
            own = httpx.get(f"{url}/wattspan/requests/{rid}", headers={"x-tenant-id": "acme corp"})
        assert other.status_code == 404 and own.status_code == 200, (other.text, own.text)
        tenants = sorted(r.tenant for r in live_meter.records)
        assert "acmecorp" in tenants and any(t.startswith("acmecorp:h") for t in tenants)  # billed apart too
        assert proxy.stats["tenant_digested"] >= 1

    def test_a_foreign_file_is_refused_with_a_clear_error(self, tmp_path, capsys):
        from wattspan.cli import main

        bad = tmp_path / "notes.sqlite"
        bad.write_text("not a database")
        assert main(["proxy", "--upstream", "http://127.0.0.1:9", "--db", str(bad)]) == 2
        assert "not a wattspan ledger" in capsys.readouterr().err


class TestLabelsAndHeaders:
    def test_tenant_from_header_else_the_api_keys_hash_never_the_key(self, live_meter, caplog):
        key = "sk-live-0123456789abcdef"
        with stack(live_meter, pseudonym_key=SECRET) as (up, proxy, url, up_url):
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"authorization": f"Bearer {key}"})
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"authorization": f"Bearer {key}", "x-tenant-id": "acme"})
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"api-key": "other-key"})
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(model="m-from-body"), headers={"x-model": "ignored"})
            httpx.post(f"{url}/v1/models", headers={"x-model": "m-from-header"})
            assert up.state.seen[0]["headers"]["authorization"] == f"Bearer {key}"  # forwarded, not kept
        recs = records(live_meter, 5)
        assert [r.tenant for r in recs[:3]] == [pseudonym(key), "acme", pseudonym("other-key")]
        assert [r.model for r in recs[3:]] == ["m-from-body", "m-from-header"]
        for r in recs:
            assert key not in repr(r.to_dict())
        assert key not in caplog.text

    def test_response_headers_are_filtered_no_duplicates_no_hop_by_hop(self, live_meter):
        up = make_upstream()

        @up.get("/v1/fake/headers")
        async def headers():
            return Response(b"{}", media_type="application/json", headers={
                "keep-alive": "timeout=5", "x-secret-hop": "1", "connection": "x-secret-hop",
                "x-wattspan-request-id": "spoofed", "proxy-authenticate": "Basic", "x-kept": "yes",
            })

        with serve(up) as up_url:
            with serve(create_proxy(up_url, meter=live_meter)) as url:
                r = httpx.get(f"{url}/v1/fake/headers")
        names = [k.lower() for k, _ in r.headers.raw]
        assert names.count(b"date") == 1 and names.count(b"server") == 1
        for gone in (b"keep-alive", b"x-secret-hop", b"proxy-authenticate"):
            assert gone not in names
        assert r.headers.get_list("x-wattspan-request-id") == [records(live_meter, 1)[0].id]
        assert r.headers["x-kept"] == "yes"


def test_middleware_endpoints_can_return_the_provisional_figure(live_meter):
    """An OpenAI-style endpoint behind EnergyMiddleware puts wattspan.usage_energy() in its usage."""
    import time

    from fastapi import FastAPI

    from wattspan import EnergyMiddleware, current_request_id, usage_energy
    from wattspan.integrations.batch import record_step

    assert usage_energy(1, 1) == {}  # outside a metered request
    app = FastAPI()

    @app.post("/v1/completions")
    async def complete(body: dict):
        rid = current_request_id()
        t = time.monotonic_ns()
        record_step(t - 20_000_000, t - 10_000_000, {rid: 8}, meter=live_meter)  # the prefill
        record_step(t - 10_000_000, t, {rid: 1}, meter=live_meter)  # one decode step
        usage = {"prompt_tokens": 8, "completion_tokens": 2}
        usage.update(usage_energy(8, 2))
        return {"choices": [], "usage": usage}

    app.add_middleware(EnergyMiddleware, meter=live_meter, request_id_header="x-wattspan-request-id")
    with serve(app) as url:
        first = httpx.post(f"{url}/v1/completions", json={})  # connects the estimate: nothing known yet
        live_meter._models["gpu0"] = StepModel(coef=np.array([60.0, 0.0, 0.0, 0.0]), r2=1.0, rows=100)  # 60 W while a step runs
        second = httpx.post(f"{url}/v1/completions", json={})
    u1, u2 = first.json()["usage"], second.json()["usage"]
    assert u1["energy_details"]["method"] in ("none", "recent-rate")
    assert u2["energy_details"] == {"provisional": True, "method": "step-model", "request_id": second.headers["x-wattspan-request-id"]}
    # 60 W dynamic + 40 W idle over its two 10 ms steps, the decode step scaled to the one decode token reported
    assert u2["energy_j"] == pytest.approx(100.0 * 0.02, rel=1e-6)
    assert live_meter.provisional._tally == {}  # forgotten once the responses ended


def test_upstream_cookies_reach_their_caller_and_never_another(live_meter):
    up = make_upstream()

    @up.get("/v1/fake/cookie")
    async def cookie(request: Request):
        seen = request.headers.get("cookie")
        r = JSONResponse({"cookie_seen": seen})
        r.set_cookie("session", "tenant-a-secret")
        return r

    with serve(up) as up_url:
        with serve(create_proxy(up_url, meter=live_meter)) as url:
            a = httpx.get(f"{url}/v1/fake/cookie")
            b = httpx.get(f"{url}/v1/fake/cookie")  # another caller, no cookie of its own
    assert "tenant-a-secret" in a.headers["set-cookie"]
    assert b.json() == {"cookie_seen": None}
