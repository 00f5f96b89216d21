// kube-userspace-proxy live stats page. No dependencies, no build step.
//
// Polls /debug/services about once a second while the page is visible and
// computes every rate here, from counter deltas over the document's now_ms:
// the proxy keeps no history for us. Only service cards on screen touch the
// DOM; the others just record their samples.
//
// DOM contract (tests/stats_browser.rs reads it):
//   #live[data-samples]            documents received so far
//   section.svc[data-key="ns/name:port/PROTO"]
//     .row[data-row="total"|"endpoint"][data-addr][data-state][data-left-ms]
//       .cell[data-rate][data-value][data-peak][data-total]
'use strict';

(() => {
  const POLL_MS = 1000;
  const HISTORY = 300; // samples kept per rate: 5 minutes at 1/s
  const LAT_WINDOW = 60; // samples over which percentiles are taken
  const MIN_SPAN = 60; // samples a chart spans at least
  const SVG = 'http://www.w3.org/2000/svg';
  // [id, label, is bytes]
  const RATES = [
    ['conns', 'conn/s', false],
    ['fails', 'fail/s', false],
    ['retries', 'retry/s', false],
    ['in', 'in B/s', true],
    ['out', 'out B/s', true],
  ];

  const $ = (id) => document.getElementById(id);
  const ui = {
    list: $('services'), filter: $('filter'), ns: $('ns'), sort: $('sort'),
    live: $('live'), iptables: $('iptables'), sync: $('last-sync'),
    count: $('count'), shown: $('shown'),
  };
  const svcs = new Map(); // key -> card
  let prevNow = 0;
  let samples = 0;
  let order = '';
  let nsList = '';
  let timer = 0;
  let inflight = false;

  const observer = 'IntersectionObserver' in window
    ? new IntersectionObserver((entries) => {
      for (const en of entries) {
        const card = en.target.card;
        card.visible = en.isIntersecting;
        if (card.visible) paint(card);
      }
    }, { rootMargin: '300px 0px' })
    : null;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function si(x) {
    const units = ['', 'k', 'M', 'G', 'T'];
    let i = 0;
    while (x >= 1000 && i < units.length - 1) { x /= 1000; i++; }
    if (i === 0 && Number.isInteger(x)) return String(x);
    return (x >= 100 ? x.toFixed(0) : x.toFixed(1)) + units[i];
  }

  function ms(seconds) {
    if (seconds < 0.001) return Math.round(seconds * 1e6) + ' µs';
    if (seconds < 1) return (seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1) + ' ms';
    return seconds.toFixed(2) + ' s';
  }

  function ago(msecs) {
    const s = Math.max(0, Math.round(msecs / 1000));
    if (s < 90) return s + ' s ago';
    if (s < 5400) return Math.round(s / 60) + ' min ago';
    return Math.round(s / 3600) + ' h ago';
  }

  // === rows and cells ===

  function makeRow(kind, label) {
    const row = el('div', 'row ' + kind);
    row.dataset.row = kind;
    const who = el('div', 'who', label);
    const state = el('div', 'state');
    row.append(who, state);
    const cells = RATES.map(([id, name]) => {
      const c = el('div', 'cell');
      c.dataset.rate = id;
      const v = el('span', 'v', '–');
      const svg = document.createElementNS(SVG, 'svg');
      svg.setAttribute('class', 'spark');
      svg.setAttribute('viewBox', `0 0 ${HISTORY} 20`);
      svg.setAttribute('preserveAspectRatio', 'none');
      svg.setAttribute('aria-hidden', 'true');
      const path = document.createElementNS(SVG, 'path');
      svg.append(path);
      c.append(el('span', 'k', name), v, svg);
      row.append(c);
      return { c, v, path, series: [], last: null, total: null, peak: 0 };
    });
    return { row, who, state, cells, data: null };
  }

  // Folds one sample of counters (RATES order; null = not counted here).
  function feed(r, counters, dt) {
    r.cells.forEach((cell, i) => {
      const now = counters[i];
      if (now === null || now === undefined) return;
      if (cell.last !== null && dt > 0) {
        // A counter that went back (the service was re-created) counts 0.
        const rate = Math.max(0, now - cell.last) / dt;
        cell.series.push(rate);
        if (rate > cell.peak) cell.peak = rate;
        if (cell.series.length > HISTORY) {
          const gone = cell.series.shift();
          if (gone >= cell.peak) cell.peak = Math.max(0, ...cell.series);
        }
      }
      cell.last = now;
      cell.total = now;
    });
  }

  function rate(r, i) {
    const s = r.cells[i].series;
    return s.length ? s[s.length - 1] : 0;
  }

  function sparkPath(series) {
    const n = series.length;
    if (n < 2) return '';
    let max = 0;
    for (const x of series) if (x > max) max = x;
    // The first minute fills the chart from the right, then it shrinks
    // to fit up to HISTORY samples.
    const step = HISTORY / (Math.max(n, MIN_SPAN) - 1);
    const off = HISTORY - (n - 1) * step;
    let d = '';
    for (let i = 0; i < n; i++) {
      const y = max > 0 ? 19 - (17 * series[i]) / max : 19;
      d += (i ? 'L' : 'M') + (off + i * step).toFixed(1) + ' ' + y.toFixed(1);
    }
    return d;
  }

  function paintRow(r) {
    r.cells.forEach((cell, i) => {
      const bytes = RATES[i][2];
      if (cell.total === null) {
        cell.v.textContent = '—';
        cell.c.title = 'counted per service';
        return;
      }
      const s = cell.series;
      const now = s.length ? s[s.length - 1] : null;
      cell.v.textContent = now === null ? '…' : si(bytes || now >= 10 ? Math.round(now) : Math.round(now * 10) / 10);
      cell.c.dataset.value = now === null ? '' : now.toFixed(3);
      cell.c.dataset.peak = cell.peak.toFixed(3);
      cell.c.dataset.total = String(cell.total);
      cell.c.title = `total ${cell.total}; peak ${si(Math.round(cell.peak))}/s over ${s.length} s`;
      if (now) cell.c.dataset.hot = ''; else delete cell.c.dataset.hot;
      cell.path.setAttribute('d', sparkPath(s));
    });
  }

  // === one service port ===

  function key(s) {
    return `${s.namespace}/${s.name}:${s.port_name}/${s.protocol}`;
  }

  function makeCard(s) {
    const sec = el('section', 'svc');
    sec.dataset.key = key(s);
    sec.dataset.ns = s.namespace;
    const head = el('div', 'head');
    const h2 = el('h2');
    h2.append(el('span', 'ns', s.namespace + '/'), document.createTextNode(s.name),
      el('span', 'port', s.port_name ? ':' + s.port_name : ''));
    const tags = el('span', 'tags');
    const lat = el('span', 'lat');
    head.append(h2, tags, lat);
    const total = makeRow('total', 'all endpoints');
    sec.append(head, total.row);
    const card = {
      key: key(s), ns: s.namespace, sec, tags, lat, total, eps: new Map(),
      lats: [], data: s, visible: !observer, text: '', tagText: '',
    };
    sec.card = card;
    if (observer) observer.observe(sec);
    return card;
  }

  function update(card, s, dt) {
    card.data = s;
    feed(card.total, [s.accepted, s.failed, s.retries, s.bytes_in, s.bytes_out], dt);
    const seen = new Set();
    for (const e of s.endpoints) {
      seen.add(e.address);
      let r = card.eps.get(e.address);
      if (!r) {
        r = makeRow('endpoint', e.address);
        r.row.dataset.addr = e.address;
        card.eps.set(e.address, r);
        card.sec.append(r.row);
      }
      r.data = e;
      // Retries are counted per service: an endpoint's failed dials are
      // what made its service retry.
      feed(r, [e.total, e.dial_failures, null, e.bytes_in, e.bytes_out], dt);
    }
    for (const [addr, r] of card.eps) {
      if (!seen.has(addr)) { r.row.remove(); card.eps.delete(addr); }
    }
    if (s.connect_buckets && s.connect_buckets.length) {
      card.lats.push({ b: s.connect_buckets, n: s.connect_count });
      if (card.lats.length > LAT_WINDOW + 1) card.lats.shift();
    }
    card.text = (card.key + ' ' + s.endpoints.map((e) => e.address).join(' ')).toLowerCase();
  }

  function endpointState(e) {
    if (e.ejected_for_ms > 0) return ['ejected', `ejected ${(e.ejected_for_ms / 1000).toFixed(1)} s`];
    if (e.ready) return ['ready', 'ready'];
    if (e.serving) return ['serving', e.terminating ? 'serving (terminating)' : 'serving'];
    if (e.terminating) return ['terminating', 'terminating'];
    return ['not-ready', 'not ready'];
  }

  // Which traffic uses an endpoint, when not all of it (as `status`).
  function endpointUse(s, address) {
    const internal = (s.internal_endpoints || []).includes(address);
    const external = (s.external_endpoints || []).includes(address);
    const takesExternal = Boolean(s.node_port) || s.external_ips.length > 0;
    if (internal && (external || !takesExternal)) return '';
    if (internal) return 'internal only';
    if (external) return 'external only';
    return 'unused';
  }

  // Prometheus' histogram_quantile: linear within the bucket.
  function quantile(q, le, b, n) {
    if (!n) return null;
    const rank = q * n;
    for (let i = 0; i < b.length; i++) {
      if (b[i] >= rank) {
        const lo = i ? le[i - 1] : 0;
        const below = i ? b[i - 1] : 0;
        const inBucket = b[i] - below;
        return inBucket > 0 ? lo + ((le[i] - lo) * (rank - below)) / inBucket : le[i];
      }
    }
    return Infinity;
  }

  function latency(card, le) {
    const l = card.lats;
    if (!l.length || !le || !le.length) return '';
    const last = l[l.length - 1];
    const first = l[0];
    let b = last.b;
    let n = last.n;
    let span = 'since start';
    if (l.length > 1 && last.n > first.n) {
      b = last.b.map((x, i) => x - (first.b[i] || 0));
      n = last.n - first.n;
      span = `last ${l.length - 1} s`;
    }
    if (!n) return 'connect: no data yet';
    const fmt = (q) => {
      const v = quantile(q, le, b, n);
      return v === Infinity ? '> ' + ms(le[le.length - 1]) : ms(v);
    };
    return `connect p50 ${fmt(0.5)} · p90 ${fmt(0.9)} · p99 ${fmt(0.99)} (${span}, ${n})`;
  }

  function paint(card) {
    const s = card.data;
    const tags = [
      ['proto', s.protocol],
      ['vip', s.cluster_ips.length ? `${s.cluster_ips[0]}:${s.port}` : `port ${s.port}`],
      s.listener_port ? ['listener', `listener :${s.listener_port}`] : ['unbound', s.unserved ? `unserved: ${s.unserved}` : 'listener unbound'],
      s.node_port ? ['nodeport', `nodePort ${s.node_port}`] : null,
      ['scheduler', s.scheduler],
      s.affinity_seconds !== null && s.affinity_seconds !== undefined ? ['affinity', `affinity ${s.affinity_seconds} s`] : null,
      s.proxy_protocol && s.proxy_protocol !== 'off' ? ['proxy-protocol', `PROXY ${s.proxy_protocol}`] : null,
      s.external_ips.length ? ['external', `external ${s.external_ips.join(' ')}`] : null,
      ['rules', s.rules ? 'rules in place' : 'no rules'],
      s.endpoint_choice ? ['choice', `endpoints: ${s.endpoint_choice}`] : null,
    ].filter(Boolean);
    const tagText = tags.map((t) => t.join('=')).join('|');
    if (tagText !== card.tagText) {
      card.tagText = tagText;
      card.tags.replaceChildren(...tags.map(([k, v]) => {
        const t = el('span', 'tag', v);
        t.dataset.tag = k;
        return t;
      }));
    }
    // UDP has sessions, not connects.
    card.lat.textContent = s.protocol === 'TCP' ? latency(card, lastLe) : '';
    const t = card.total;
    t.row.dataset.state = s.endpoints.some((e) => e.ejected_for_ms > 0) ? 'degraded' : 'ok';
    t.state.textContent = `${s.active} open · ${s.accepted} conns · ${s.failed} failed · ${s.retries} retries`;
    paintRow(t);
    for (const r of card.eps.values()) {
      const e = r.data;
      const [state, label] = endpointState(e);
      r.row.dataset.state = state;
      r.row.dataset.leftMs = String(e.ejected_for_ms);
      const badge = el('span', 'badge', label);
      const extra = [`${e.active} open`];
      const use = endpointUse(s, e.address);
      if (use) extra.push(use);
      if (e.ejections) extra.push(`${e.ejections} ejections`);
      if (e.connect_us) extra.push(`~${ms(e.connect_us / 1e6)}`);
      r.state.replaceChildren(badge, document.createTextNode(' ' + extra.join(' · ')));
      paintRow(r);
    }
  }

  // === the list: filter, sort ===

  function sortKey(card) {
    const t = card.total;
    switch (ui.sort.value) {
      case 'conns': return -rate(t, 0);
      case 'bytes': return -(rate(t, 3) + rate(t, 4));
      case 'trouble': return -(rate(t, 1) + rate(t, 2));
      case 'ejected': return -card.data.endpoints.filter((e) => e.ejected_for_ms > 0).length;
      default: return 0;
    }
  }

  function arrange() {
    const q = ui.filter.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    const ns = ui.ns.value;
    let shown = 0;
    const cards = [...svcs.values()];
    for (const c of cards) {
      const match = (!ns || c.ns === ns) && q.every((w) => c.text.includes(w));
      c.sec.hidden = !match;
      if (match) shown++;
    }
    const keyed = cards.map((c) => [sortKey(c), c.key, c]);
    keyed.sort((a, b) => a[0] - b[0] || (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
    const next = keyed.map((k) => k[1]).join('\n');
    if (next !== order) {
      order = next;
      for (const [, , c] of keyed) ui.list.append(c.sec);
    }
    ui.shown.textContent = shown === cards.length ? '' : `${shown} shown`;
  }

  function saveView() {
    const p = new URLSearchParams();
    if (ui.filter.value) p.set('q', ui.filter.value);
    if (ui.ns.value) p.set('ns', ui.ns.value);
    if (ui.sort.value !== 'name') p.set('sort', ui.sort.value);
    history.replaceState(null, '', p.toString() ? '#' + p : location.pathname);
  }

  function onView() {
    saveView();
    arrange();
    for (const c of svcs.values()) if (c.visible && !c.sec.hidden) paint(c);
  }

  // === polling ===

  let lastLe = [];

  function ingest(doc) {
    const dt = prevNow && doc.now_ms > prevNow ? (doc.now_ms - prevNow) / 1000 : 0;
    prevNow = doc.now_ms;
    samples++;
    lastLe = doc.connect_buckets_le || [];
    ui.iptables.textContent = doc.iptables;
    ui.iptables.dataset.state = doc.iptables;
    ui.sync.textContent = doc.last_sync_ms ? ago(doc.now_ms - doc.last_sync_ms) : 'never';
    if (doc.last_sync_ms) ui.sync.title = new Date(doc.last_sync_ms).toISOString();
    ui.count.textContent = String(doc.services.length);
    const seen = new Set();
    for (const s of doc.services) {
      const k = key(s);
      seen.add(k);
      let card = svcs.get(k);
      if (!card) {
        card = makeCard(s);
        svcs.set(k, card);
        order = '';
      }
      update(card, s, dt);
    }
    for (const [k, c] of svcs) {
      if (!seen.has(k)) {
        if (observer) observer.unobserve(c.sec);
        c.sec.remove();
        svcs.delete(k);
      }
    }
    const names = [...new Set(doc.services.map((s) => s.namespace))].sort();
    if (names.join('\n') !== nsList) {
      nsList = names.join('\n');
      const keep = ui.ns.value;
      ui.ns.replaceChildren(new Option('all namespaces', ''), ...names.map((n) => new Option(n, n)));
      ui.ns.value = names.includes(keep) ? keep : '';
    }
    arrange();
    for (const c of svcs.values()) if (c.visible && !c.sec.hidden) paint(c);
    ui.live.dataset.samples = String(samples);
    ui.live.dataset.state = 'live';
    ui.live.textContent = `live · ${new Date(doc.now_ms).toLocaleTimeString()}`;
  }

  function schedule(delay) {
    clearTimeout(timer);
    if (!document.hidden) timer = setTimeout(poll, delay);
  }

  async function poll() {
    if (inflight) return;
    inflight = true;
    let delay = POLL_MS;
    try {
      const res = await fetch('/debug/services', { cache: 'no-store' });
      if (!res.ok) throw new Error(`/debug/services: HTTP ${res.status}`);
      ingest(await res.json());
    } catch (err) {
      ui.live.dataset.state = 'error';
      ui.live.textContent = `no data: ${err.message}; retrying`;
      delay = 2 * POLL_MS;
    } finally {
      inflight = false;
    }
    schedule(delay);
  }

  // Nobody looking, nothing polled: stop while hidden, resume at once.
  document.addEventListener('visibilitychange', () => {
    if (document.hidden) clearTimeout(timer);
    else schedule(0);
  });

  const saved = new URLSearchParams(location.hash.slice(1));
  ui.filter.value = saved.get('q') || '';
  if (saved.get('sort')) ui.sort.value = saved.get('sort');
  const wantNs = saved.get('ns');
  if (wantNs) ui.ns.replaceChildren(new Option('all namespaces', ''), new Option(wantNs, wantNs));
  ui.ns.value = wantNs || '';
  ui.filter.addEventListener('input', onView);
  ui.ns.addEventListener('change', onView);
  ui.sort.addEventListener('change', onView);
  poll();
})();
