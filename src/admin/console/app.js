// mailroot's web console: a small hand-written script over the admin API (no framework, no
// build step). Everything the API returns came, at some point, from the network: it is put into
// the page as text (textContent), never as markup.
'use strict';

// The API lives beside the console: `<base>/console/` → `<base>/api/…`, whatever path a reverse
// proxy serves us under.
const base = location.pathname.replace(/\/console\/.*$/, '');
const TOKEN_KEY = 'mailroot-admin-token';
const REFRESH_MS = 5000;

let token = sessionStorage.getItem(TOKEN_KEY) || '';
let timer = null;
// Counts page changes: a refresh still answering from the page before does not schedule more.
let generation = 0;
let lastStatus = null;
// Set when an action navigates on its own (a bounce or delete returns to the queue): the next
// page keeps the action's message instead of clearing it.
let keepFlash = false;

const $ = (id) => document.getElementById(id);

// --- the API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: 'Bearer ' + token };
  const init = { method, headers, cache: 'no-store' };
  if (method !== 'GET') {
    // JSON is what the API requires of every change: an HTML form on another site cannot send it.
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body === undefined ? {} : body);
  }
  let r;
  try {
    r = await fetch(base + path, init);
  } catch (e) {
    throw new ApiError(0, 'mailroot is not answering (' + e.message + ')');
  }
  let data = {};
  try {
    data = await r.json();
  } catch (e) {
    data = {};
  }
  if (r.status === 401) {
    signOut('The token was not accepted: sign in again.');
    throw new ApiError(401, 'not signed in');
  }
  if (!r.ok) {
    throw new ApiError(r.status, data.error || r.status + ' ' + r.statusText);
  }
  return data;
}

// --- small helpers -----------------------------------------------------------------------------

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement('tr');
  for (const c of cells) {
    const td = document.createElement('td');
    if (c instanceof Node) td.appendChild(c);
    else td.textContent = c === undefined || c === null ? '' : String(c);
    tr.appendChild(td);
  }
  return tr;
}

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren(...rows);
  if (rows.length === 0) {
    const td = el('td', empty, 'empty');
    td.colSpan = columns;
    const tr = document.createElement('tr');
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return '';
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return seconds + ' s';
  if (seconds < 3600) return Math.floor(seconds / 60) + ' min ' + (seconds % 60) + ' s';
  if (seconds < 86400) return Math.floor(seconds / 3600) + ' h ' + Math.floor((seconds % 3600) / 60) + ' min';
  return Math.floor(seconds / 86400) + ' d ' + Math.floor((seconds % 86400) / 3600) + ' h';
}

function when(unix) {
  if (!unix) return '';
  const d = new Date(unix * 1000);
  const delta = unix - Date.now() / 1000;
  const rel = delta >= 0 ? 'in ' + duration(delta) : duration(-delta) + ' ago';
  return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC') + ' (' + rel + ')';
}

function bytes(n) {
  if (n < 1024) return n + ' B';
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + ' KiB';
  return (n / 1024 / 1024).toFixed(1) + ' MiB';
}

function seconds(s) {
  if (s === null || s === undefined) return '';
  if (s < 0.001) return (s * 1e6).toFixed(0) + ' µs';
  if (s < 1) return (s * 1e3).toFixed(1) + ' ms';
  return s.toFixed(2) + ' s';
}

function plural(n, word) {
  return n + ' ' + word + (n === 1 ? '' : 's');
}

function flash(text, isError) {
  const f = $('flash');
  f.textContent = text;
  f.className = isError ? 'error' : 'ok';
}

// A confirmation for what loses mail or stops the daemon: a dialog, not window.confirm, so it
// can be styled, read by a screen reader and driven by the browser tests.
function confirmAction(text) {
  const d = $('confirm');
  $('confirm-text').textContent = text;
  return new Promise((resolve) => {
    const done = (answer) => {
      $('confirm-yes').onclick = null;
      $('confirm-no').onclick = null;
      d.onclose = null;
      if (d.open) d.close();
      resolve(answer);
    };
    $('confirm-yes').onclick = () => done(true);
    $('confirm-no').onclick = () => done(false);
    d.onclose = () => done(false);
    d.showModal();
  });
}

// --- sign in and out ---------------------------------------------------------------------------

function signOut(why) {
  token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  show('signin');
  if (why) $('signin-error').textContent = why;
}

async function signIn(ev) {
  ev.preventDefault();
  token = $('token').value.trim();
  $('signin-error').textContent = '';
  try {
    await api('GET', '/api/status');
  } catch (e) {
    if (e.status !== 401) $('signin-error').textContent = e.message;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token').value = '';
  if (!location.hash || location.hash === '#signin') location.hash = '#overview';
  else route();
}

// --- pages -------------------------------------------------------------------------------------

const views = ['signin', 'overview', 'queue', 'message', 'sessions', 'actors', 'controls'];

function show(name) {
  for (const v of views) $('view-' + v).hidden = v !== name;
  $('nav').hidden = name === 'signin';
  for (const a of document.querySelectorAll('#nav a')) {
    const current = a.id === 'nav-' + name || (name === 'message' && a.id === 'nav-queue');
    if (current) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (name === 'signin') {
    $('token').focus();
  }
}

function route() {
  clearTimeout(timer);
  timer = null;
  const mine = ++generation;
  if (!token) {
    show('signin');
    return;
  }
  if (!keepFlash) flash('');
  keepFlash = false;
  const hash = location.hash.replace(/^#/, '') || 'overview';
  const [page, arg] = hash.split('/');
  const pages = {
    overview: [loadOverview, true],
    queue: [loadQueue, false],
    message: [() => loadMessage(arg), false],
    sessions: [loadSessions, true],
    actors: [loadActors, true],
    controls: [loadControls, true],
  };
  const [load, live] = pages[page] || pages.overview;
  show(pages[page] ? page : 'overview');
  // The next refresh is asked for once this one has answered, never on a clock: a slow daemon
  // gets one request at a time from a console, not a growing pile.
  const run = async () => {
    await load().catch((e) => e.status !== 401 && flash(e.message, true));
    if (live && mine === generation) timer = setTimeout(run, REFRESH_MS);
  };
  run();
}

function showState(status) {
  lastStatus = status;
  $('hostname').textContent = status.hostname;
  const b = $('state-badge');
  b.textContent = status.state;
  b.className = 'badge state-' + status.state;
}

// Overview ---------------------------------------------------------------------------------------

async function loadOverview() {
  const [status, history] = await Promise.all([api('GET', '/api/status'), api('GET', '/api/history')]);
  showState(status);
  $('ov-state').textContent = status.state;
  $('ov-version').textContent = 'mailroot ' + status.version + ', up ' + duration(status.uptime_seconds);
  $('ov-connections').textContent = status.connections;
  $('ov-listeners').textContent = 'on ' + plural(status.listeners.length, 'listener');
  const q = status.queue;
  $('ov-queue-total').textContent = plural(q.total, 'message');
  const dl = $('ov-queue');
  dl.replaceChildren();
  for (const k of ['active', 'ready', 'deferred', 'held']) {
    dl.appendChild(el('dt', k));
    dl.appendChild(el('dd', q[k]));
  }
  const store = $('ov-store');
  if (q.store_error) {
    store.textContent = q.store_wedged ? 'wedged' : 'failing';
    store.className = 'big bad';
    $('ov-store-detail').textContent = q.store_error;
  } else {
    store.textContent = 'healthy';
    store.className = 'big good';
    $('ov-store-detail').textContent = 'new mail is accepted';
  }
  fill(
    $('listeners').tBodies[0],
    status.listeners.map((l) => row([l.name, l.role, l.addresses.join(', '), l.connections])),
    'no SMTP listener',
    4,
  );
  drawCharts(history.minutes);
}

const SERIES = [
  ['received', 'Received'],
  ['delivered', 'Delivered'],
  ['deferred', 'Deferred'],
  ['bounced', 'Bounced'],
];

// Bar charts as SVG built element by element (no library): one bar per minute, oldest left.
function drawCharts(minutes) {
  const box = $('charts');
  box.replaceChildren();
  const ns = 'http://www.w3.org/2000/svg';
  for (const [key, title] of SERIES) {
    const values = minutes.map((m) => m[key] || 0);
    const total = values.reduce((a, b) => a + b, 0);
    const max = Math.max(1, ...values);
    const fig = el('figure', null, 'chart');
    const cap = el('figcaption');
    cap.appendChild(el('strong', title));
    cap.appendChild(document.createTextNode(' ' + total + ' in the hour, at most ' + Math.max(...values, 0) + '/min'));
    const svg = document.createElementNS(ns, 'svg');
    const width = 240;
    const height = 60;
    svg.setAttribute('viewBox', '0 0 ' + width + ' ' + height);
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', title + ' per minute over the last hour: ' + total + ' in all');
    svg.classList.add('series-' + key);
    const w = width / Math.max(values.length, 1);
    values.forEach((v, i) => {
      const h = (v / max) * (height - 2);
      const r = document.createElementNS(ns, 'rect');
      r.setAttribute('x', (i * w).toFixed(2));
      r.setAttribute('y', (height - h).toFixed(2));
      r.setAttribute('width', Math.max(w - 1, 1).toFixed(2));
      r.setAttribute('height', h.toFixed(2));
      const t = document.createElementNS(ns, 'title');
      t.textContent = v + ' at ' + new Date(minutes[i].at * 1000).toISOString().slice(11, 16) + ' UTC';
      r.appendChild(t);
      svg.appendChild(r);
    });
    fig.appendChild(svg);
    const axis = el('div', null, 'axis');
    axis.appendChild(el('span', '60 min ago'));
    axis.appendChild(el('span', 'now'));
    fig.appendChild(axis);
    fig.appendChild(cap);
    box.appendChild(fig);
  }
}

// Queue ------------------------------------------------------------------------------------------

const queueState = { after: null, next: null, pages: [] };

function filterQuery() {
  const p = new URLSearchParams();
  for (const k of ['state', 'domain', 'sender', 'recipient']) {
    const v = $('f-' + k).value.trim();
    if (v) p.set(k, v);
  }
  return p;
}

async function loadQueue() {
  const p = filterQuery();
  p.set('limit', '100');
  if (queueState.after !== null) p.set('after', String(queueState.after));
  const page = await api('GET', '/api/queue?' + p.toString());
  queueState.next = page.next_after;
  const body = $('queue-table').tBodies[0];
  const rows = page.messages.map((m) => {
    const box = el('input');
    box.type = 'checkbox';
    box.value = m.id;
    box.className = 'q-select';
    box.setAttribute('aria-label', 'Select message ' + m.id);
    box.addEventListener('change', countSelected);
    const link = el('a', m.id);
    link.href = '#message/' + m.id;
    const pending = m.recipients.filter((r) => r.status === 'pending').length;
    const first = m.recipients.length ? m.recipients[0].address : '';
    const more = m.recipients.length > 1 ? ' +' + (m.recipients.length - 1) : '';
    const tr = row([box, link, m.state, m.sender || '<>', first + more + ' (' + pending + ' pending)', bytes(m.size),
      duration(m.age_seconds), m.attempts, m.next_attempt ? when(m.next_attempt) : '']);
    tr.dataset.id = m.id;
    tr.dataset.state = m.state;
    return tr;
  });
  fill(body, rows, 'no message matches', 9);
  $('q-select-page').checked = false;
  $('q-next').disabled = queueState.next === null || queueState.next === undefined;
  $('q-first').disabled = queueState.after === null;
  $('q-prev').disabled = queueState.pages.length === 0;
  const shown = page.messages.length;
  $('q-count').textContent = plural(shown, 'message') + ' on this page' + (queueState.next ? '; more follow' : '');
  countSelected();
}

function selectedIds() {
  return [...document.querySelectorAll('.q-select:checked')].map((b) => Number(b.value));
}

function countSelected() {
  const all = $('q-all-matching').checked;
  $('q-selected').textContent = all ? 'every matching message' : selectedIds().length + ' selected';
}

// Every ID the filter matches, walked page by page (the API bounds each page's work).
async function allMatching() {
  const ids = [];
  let after = null;
  for (;;) {
    const p = filterQuery();
    p.set('limit', '1000');
    if (after !== null) p.set('after', String(after));
    const page = await api('GET', '/api/queue?' + p.toString());
    for (const m of page.messages) ids.push(m.id);
    if (page.next_after === null || page.next_after === undefined) return ids;
    after = page.next_after;
  }
}

// What an action that loses mail does, said in its confirmation (for many, then for one).
const LOSES_MAIL = { bounce: 'returned to their senders as undeliverable', delete: 'deleted without a notice to anyone' };
const LOSES_ONE = { bounce: 'returned to its sender as undeliverable', delete: 'deleted without a notice to anyone' };

async function bulk(action) {
  const everything = $('q-all-matching').checked;
  let ids = everything ? null : selectedIds();
  if (ids && ids.length === 0) {
    flash('Select messages first (or tick "every message matching the filter").', true);
    return;
  }
  if (LOSES_MAIL[action] || everything) {
    const what = everything ? 'every message matching the filter' : plural(ids.length, 'message');
    const effect = LOSES_MAIL[action] ? ' will be ' + LOSES_MAIL[action] : '';
    const ok = await confirmAction(action[0].toUpperCase() + action.slice(1) + ' ' + what + '?' + (effect ? ' They' + effect + '.' : ''));
    if (!ok) return;
  }
  try {
    if (everything) ids = await allMatching();
    let done = 0;
    const failed = [];
    for (let i = 0; i < ids.length; i += 1000) {
      const r = await api('POST', '/api/queue/bulk', { action, ids: ids.slice(i, i + 1000) });
      done += r.done;
      failed.push(...r.failed);
    }
    const note = failed.length ? '; not done for ' + failed.length + ' (' + failed.slice(0, 3).map((f) => f.id + ': ' + f.error).join('; ') + ')' : '';
    flash(action + ': done for ' + plural(done, 'message') + note, failed.length > 0);
    $('q-all-matching').checked = false;
    await loadQueue();
  } catch (e) {
    if (e.status !== 401) flash(e.message, true);
  }
}

async function loadMessage(id) {
  if (!/^\d+$/.test(id || '')) {
    location.hash = '#queue';
    return;
  }
  const [m, h] = await Promise.all([
    api('GET', '/api/queue/' + id),
    api('GET', '/api/queue/' + id + '/headers').catch((e) => ({ headers: '(' + e.message + ')' })),
  ]);
  $('m-title').textContent = 'Message ' + m.id;
  const dl = $('m-fields');
  dl.replaceChildren();
  const fields = [
    ['State', m.state],
    ['Sender', m.sender || '<> (null sender)'],
    ['Size', bytes(m.size)],
    ['Received', when(m.received_at)],
    ['Source', m.source],
    ['From', m.origin],
    ['Attempts', m.attempts],
    ['Next attempt', m.next_attempt ? when(m.next_attempt) : '—'],
  ];
  for (const [k, v] of fields) {
    dl.appendChild(el('dt', k));
    dl.appendChild(el('dd', v));
  }
  $('m-hold').disabled = m.state === 'held';
  $('m-release').disabled = m.state !== 'held';
  fill(
    $('m-recipients').tBodies[0],
    m.recipients.map((r) => row([r.address, r.status, r.attempts, r.last_reply || '', r.next_attempt ? when(r.next_attempt) : ''])),
    'no recipients',
    5,
  );
  $('m-headers').textContent = h.headers;
}

async function oneAction(action) {
  const id = location.hash.split('/')[1];
  if (LOSES_ONE[action]) {
    const ok = await confirmAction(action[0].toUpperCase() + action.slice(1) + ' message ' + id + '? It will be ' + LOSES_ONE[action] + '.');
    if (!ok) return;
  }
  try {
    if (action === 'delete') await api('DELETE', '/api/queue/' + id);
    else await api('POST', '/api/queue/' + id + '/' + action);
    flash(action + ': done for message ' + id);
    if (action === 'bounce' || action === 'delete') {
      keepFlash = true;
      location.hash = '#queue';
    } else {
      await loadMessage(id);
    }
  } catch (e) {
    if (e.status !== 401) flash(e.message, true);
  }
}

// Sessions ---------------------------------------------------------------------------------------

async function loadSessions() {
  const list = await api('GET', '/api/sessions');
  $('s-count').textContent = plural(list.total, 'open session') + (list.total > list.sessions.length ? ', the oldest ' + list.sessions.length + ' shown' : '');
  fill(
    $('sessions-table').tBodies[0],
    list.sessions.map((s) => {
      const b = el('button', 'Disconnect…', 'danger small');
      b.type = 'button';
      b.setAttribute('aria-label', 'Disconnect session ' + s.id + ' from ' + s.client);
      b.addEventListener('click', () => disconnect(s));
      return row([s.id, s.listener, s.client, s.state, s.user || '', s.helo || '', s.tls ? 'yes' : 'no', duration(s.age_seconds), b]);
    }),
    'no open SMTP session',
    9,
  );
}

async function disconnect(s) {
  const ok = await confirmAction('Disconnect session ' + s.id + ' from ' + s.client + '? The client gets 421; a message it is sending is not accepted.');
  if (!ok) return;
  try {
    await api('POST', '/api/sessions/' + s.id + '/disconnect');
    flash('session ' + s.id + ' disconnected');
  } catch (e) {
    if (e.status !== 401) flash(e.message, true);
  }
  await loadSessions().catch(() => {});
}

// Actors -----------------------------------------------------------------------------------------

async function loadActors() {
  const { actors } = await api('GET', '/api/actors');
  const busiest = Math.max(0, ...actors.map((a) => a.in_flight));
  fill(
    $('actors-table').tBodies[0],
    actors.map((a) => {
      const tr = row([a.actor, a.live, a.handled, a.in_flight, a.restarts, seconds(a.mean_seconds),
        a.p99_seconds === null && a.handled > 0 ? '> 52 s' : seconds(a.p99_seconds)]);
      if (a.restarts > 0) tr.className = 'warn';
      else if (busiest > 0 && a.in_flight === busiest) tr.className = 'busy';
      return tr;
    }),
    'no actor has reported yet',
    7,
  );
}

// Controls ---------------------------------------------------------------------------------------

async function loadControls() {
  const status = await api('GET', '/api/status');
  showState(status);
  $('c-state').textContent = status.state;
  $('c-pause').disabled = status.state !== 'running';
  $('c-resume').disabled = status.state !== 'paused';
  $('c-stop').disabled = status.state === 'stopping';
}

async function control(action) {
  if (action === 'stop') {
    const ok = await confirmAction('Stop mailroot on ' + (lastStatus ? lastStatus.hostname : 'this host') + '? It will not start again by itself unless a service manager restarts it.');
    if (!ok) return;
  }
  try {
    const r = await api('POST', '/api/server/' + action);
    if (action === 'reload') {
      const text = r.changed.length ? 'Applied: ' + r.changed.join(', ') : 'Nothing changed.';
      $('c-reload-result').textContent = new Date().toISOString().slice(11, 19) + ' UTC — ' + text;
      flash('configuration reloaded');
    } else {
      flash(action === 'stop' ? 'mailroot is stopping' : 'mailroot is ' + r.state);
    }
  } catch (e) {
    if (action === 'reload' && e.status === 422) {
      $('c-reload-result').textContent = new Date().toISOString().slice(11, 19) + ' UTC — refused, nothing applied: ' + e.message;
      flash('the new configuration was refused', true);
    } else if (e.status !== 401) {
      flash(e.message, true);
    }
  }
  await loadControls().catch(() => {});
}

// --- wiring ------------------------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  $('signin-form').addEventListener('submit', signIn);
  $('signout').addEventListener('click', () => {
    signOut('');
    location.hash = '#signin';
  });
  $('queue-filter').addEventListener('submit', (ev) => {
    ev.preventDefault();
    queueState.after = null;
    queueState.pages = [];
    loadQueue().catch((e) => e.status !== 401 && flash(e.message, true));
  });
  $('f-clear').addEventListener('click', () => {
    for (const k of ['state', 'domain', 'sender', 'recipient']) $('f-' + k).value = '';
    queueState.after = null;
    queueState.pages = [];
    loadQueue().catch((e) => e.status !== 401 && flash(e.message, true));
  });
  $('q-next').addEventListener('click', () => {
    queueState.pages.push(queueState.after);
    queueState.after = queueState.next;
    loadQueue().catch((e) => e.status !== 401 && flash(e.message, true));
  });
  $('q-prev').addEventListener('click', () => {
    queueState.after = queueState.pages.length ? queueState.pages.pop() : null;
    loadQueue().catch((e) => e.status !== 401 && flash(e.message, true));
  });
  $('q-first').addEventListener('click', () => {
    queueState.after = null;
    queueState.pages = [];
    loadQueue().catch((e) => e.status !== 401 && flash(e.message, true));
  });
  $('q-select-page').addEventListener('change', (ev) => {
    for (const b of document.querySelectorAll('.q-select')) b.checked = ev.target.checked;
    countSelected();
  });
  $('q-all-matching').addEventListener('change', countSelected);
  for (const b of document.querySelectorAll('[data-bulk]')) b.addEventListener('click', () => bulk(b.dataset.bulk));
  for (const b of document.querySelectorAll('[data-one]')) b.addEventListener('click', () => oneAction(b.dataset.one));
  for (const a of ['pause', 'resume', 'reload', 'stop']) $('c-' + a).addEventListener('click', () => control(a));
  window.addEventListener('hashchange', route);
  route();
});
