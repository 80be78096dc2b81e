// The Lamina chat page: one ES module, no build step. Everything it shows comes from
// the REST API, called with the user's identity; text from the API is always inserted
// as text (never as HTML), so an answer or a document cannot inject markup.

const config = JSON.parse(document.getElementById("lamina-config").textContent);
const $ = (id) => document.getElementById(id);

const state = {
  conversationId: null,
  busy: false,
  /** The element to give focus back to when the passage panel closes. */
  opener: null,
};

// --- small DOM helpers ----------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function announce(text) {
  // Cleared first so that the same words twice are announced twice.
  $("status").textContent = "";
  window.setTimeout(() => {
    $("status").textContent = text;
  }, 50);
}

function showNotice(text) {
  const notice = $("notice");
  notice.textContent = text;
  notice.hidden = !text;
}

// --- errors ---------------------------------------------------------------------------

/** An API error (application/problem+json), with what a user needs to report it. */
class ApiProblem extends Error {
  constructor({ status, title, detail, code, correlationId }) {
    super(detail || title);
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.code = code;
    this.correlationId = correlationId;
  }

  /** Refusals (not allowed, or a message the assistant will not take) read differently
   * from failures: nothing is broken, and trying again will not help. */
  get refusal() {
    return this.status === 403 || (this.status === 422 && this.title === "Message rejected");
  }
}

async function problemOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page): the status line is all there is.
  }
  return new ApiProblem({
    status: response.status,
    title: body.title || response.statusText || "Request failed",
    detail: body.detail || "",
    code: body.code,
    correlationId: body.correlation_id || response.headers.get("X-Correlation-ID"),
  });
}

function networkProblem(error) {
  return new ApiProblem({
    status: 0,
    title: "Lamina cannot be reached",
    detail: `Check your connection and try again. (${error.message})`,
  });
}

/** An ``error`` event: the turn failed after its stream began. */
function streamProblem(data) {
  return new ApiProblem({
    status: 0,
    title: "The answer could not be finished",
    detail: data.message,
    code: data.code,
    correlationId: data.correlation_id,
  });
}

function problemView(problem) {
  const refusal = problem instanceof ApiProblem && problem.refusal;
  const title = refusal ? "I can't help with that" : problem.title || "Something went wrong";
  const box = el(
    "div",
    { class: refusal ? "problem refusal" : "problem", role: "alert" },
    el("p", { class: "problem-title" }, title),
    el("p", {}, refusal ? problem.detail || problem.title : problem.detail || problem.message),
  );
  if (problem.correlationId) {
    box.append(
      el(
        "p",
        { class: "problem-reference" },
        "Reference for support: ",
        el("code", {}, problem.correlationId),
      ),
    );
  }
  return box;
}

// --- identity -------------------------------------------------------------------------

function devIdentity(cfg) {
  const select = $("dev-user");
  for (const user of cfg.users) select.add(new Option(user.name, user.id));
  const saved = sessionStorage.getItem("lamina.devUser");
  if (saved && cfg.users.some((user) => user.id === saved)) select.value = saved;
  $("dev-signin").hidden = false;
  select.addEventListener("change", () => {
    sessionStorage.setItem("lamina.devUser", select.value);
    identityChanged();
  });
  return {
    signedIn: () => cfg.users.length > 0,
    async headers() {
      const user = cfg.users.find((candidate) => candidate.id === select.value);
      return {
        "X-Lamina-User": user.id,
        "X-Lamina-Groups": user.groups.join(","),
        "X-Lamina-Roles": user.roles.join(","),
        "X-Lamina-Tenant": cfg.tenant,
      };
    },
  };
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = el("script", { src });
    script.addEventListener("load", resolve);
    script.addEventListener("error", () => reject(new Error(`${src} did not load`)));
    document.head.append(script);
  });
}

async function entraIdentity(cfg) {
  if (!cfg.configured) {
    showNotice(
      "Sign-in is not configured on this server: set LAMINA_WEB__CLIENT_ID, " +
        "LAMINA_WEB__AUTHORITY and LAMINA_WEB__API_SCOPES.",
    );
    return { signedIn: () => false, headers: async () => ({}) };
  }
  // The vendored UMD build defines globalThis.msal; loaded only in this mode.
  await loadScript("/static/vendor/msal-browser/msal-browser.min.js");
  const msal = globalThis.msal;
  const client = new msal.PublicClientApplication({
    auth: { clientId: cfg.clientId, authority: cfg.authority, redirectUri: `${location.origin}/` },
    cache: { cacheLocation: "sessionStorage" },
  });
  await client.initialize();
  const redirected = await client.handleRedirectPromise();
  const account = redirected?.account ?? client.getAllAccounts()[0] ?? null;
  if (account) client.setActiveAccount(account);
  const request = { scopes: cfg.scopes };

  const signIn = $("sign-in");
  const signOut = $("sign-out");
  signIn.addEventListener("click", () => client.loginRedirect(request));
  signOut.addEventListener("click", () => client.logoutRedirect());
  signIn.hidden = Boolean(account);
  signOut.hidden = !account;
  $("signed-in-as").textContent = account ? `Signed in as ${account.name || account.username}` : "";

  return {
    signedIn: () => Boolean(client.getActiveAccount()),
    async headers() {
      const active = client.getActiveAccount();
      try {
        const token = await client.acquireTokenSilent({ ...request, account: active });
        return { Authorization: `Bearer ${token.accessToken}` };
      } catch (error) {
        if (error instanceof msal.InteractionRequiredAuthError) {
          await client.acquireTokenRedirect(request);
        }
        throw error;
      }
    },
  };
}

// --- the API ----------------------------------------------------------------------------

async function api(path, { method = "GET", body } = {}) {
  const headers = { ...(await identity.headers()), Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw networkProblem(error);
  }
  if (!response.ok) throw await problemOf(response);
  return response.status === 204 ? null : response.json();
}

/** POST ``body`` and yield the server-sent events of the response as {event, data}.
 * (EventSource cannot send a body or credentials headers, so the stream is parsed here.) */
async function* streamEvents(path, body) {
  const headers = {
    ...(await identity.headers()),
    "Content-Type": "application/json",
    Accept: "text/event-stream",
  };
  let response;
  try {
    response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  } catch (error) {
    throw networkProblem(error);
  }
  if (!response.ok) throw await problemOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    let text = pending + value;
    // A CR at the end of a chunk may be the first half of a CRLF: keep it for the next.
    const splitLineEnd = text.endsWith("\r");
    if (splitLineEnd) text = text.slice(0, -1);
    text = text.replace(/\r\n?/g, "\n");
    let end;
    while ((end = text.indexOf("\n\n")) >= 0) {
      const parsed = parseEvent(text.slice(0, end));
      text = text.slice(end + 2);
      if (parsed) yield parsed;
    }
    pending = text + (splitLineEnd ? "\r" : "");
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments are keep-alive pings
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
}

// --- citations and the passage panel -------------------------------------------------------

/** ``text`` with each ``[n]`` that names a citation as a button opening its passage. */
function answerWithCitations(text, citations) {
  const byRef = new Map(citations.map((citation) => [String(citation.ref), citation]));
  const fragment = document.createDocumentFragment();
  let last = 0;
  for (const match of text.matchAll(/\[(\d+)\]/g)) {
    const citation = byRef.get(match[1]);
    if (!citation) continue;
    fragment.append(text.slice(last, match.index), citeButton(citation, `[${citation.ref}]`));
    last = match.index + match[0].length;
  }
  fragment.append(text.slice(last));
  return fragment;
}

function citeButton(citation, label) {
  return el(
    "button",
    {
      type: "button",
      class: "cite",
      "aria-label": `Source ${citation.ref}: ${citation.title}`,
      "data-chunk-id": citation.chunk_id,
      onclick: (event) => openPassage(citation, event.currentTarget),
    },
    label,
  );
}

function sourcesList(citations) {
  const list = el("ol", { class: "sources", "aria-label": "Sources" });
  for (const citation of citations) {
    const where = [citation.source, citation.page ? `page ${citation.page}` : null]
      .filter(Boolean)
      .join(", ");
    list.append(
      el(
        "li",
        {},
        citeButton(citation, `[${citation.ref}] ${citation.title}`),
        el("span", { class: "source-where" }, ` ${where}`),
      ),
    );
  }
  return list;
}

async function openPassage(citation, opener) {
  const panel = $("passage-panel");
  state.opener = opener;
  $("passage-title").textContent = citation.title;
  $("passage-source").textContent = "";
  $("passage-text").textContent = "Loading…";
  panel.hidden = false;
  panel.focus();
  try {
    const passage = await api(`/v1/chunks/${encodeURIComponent(citation.chunk_id)}`);
    $("passage-title").textContent = passage.title;
    $("passage-source").textContent = [
      passage.source,
      passage.section,
      passage.page ? `page ${passage.page}` : null,
    ]
      .filter(Boolean)
      .join(" · ");
    $("passage-text").textContent = passage.text;
  } catch (problem) {
    $("passage-text").replaceChildren(
      problem.status === 404
        ? el("p", {}, "This passage is not available to you (it may have been removed).")
        : problemView(problem),
    );
  }
}

function closePassage() {
  const panel = $("passage-panel");
  if (panel.hidden) return;
  panel.hidden = true;
  state.opener?.focus();
  state.opener = null;
}

// --- one question and its answer ------------------------------------------------------------

class TurnView {
  constructor(question) {
    this.text = "";
    this.citations = [];
    this.answerText = el("div", { class: "answer-text" });
    this.sources = el("div", { class: "sources-box" });
    this.planner = el("p", { class: "planner" });
    this.steps = el("ol", { class: "steps" });
    this.how = el(
      "details",
      { class: "how", ontoggle: () => this.explain() },
      el("summary", {}, "How I answered"),
      this.planner,
      this.steps,
    );
    this.extra = el("div", { class: "turn-extra" });
    this.answer = el(
      "article",
      { class: "answer", "aria-live": "polite", "aria-busy": "true", "aria-label": "Answer" },
      el("p", { class: "who" }, "Lamina"),
      this.answerText,
      this.sources,
      this.extra,
      this.how,
    );
    this.item = el(
      "li",
      { class: "turn" },
      el("div", { class: "question" }, el("p", { class: "who" }, "You"), el("p", {}, question)),
      this.answer,
    );
    $("messages").append(this.item);
    this.item.scrollIntoView({ block: "end" });
  }

  /** Apply one streamed event; returns true when the stream ends with it. */
  apply({ event, data }) {
    if (event === "plan") this.plan(data.plan);
    else if (event === "step") this.step(data);
    else if (event === "delta") this.delta(data.text);
    else if (event === "citations") this.cite(data.citations);
    else if (event === "approval_required") this.approvalRequired(data);
    else if (event === "approval") this.decided(data);
    else if (event === "error") this.fail(streamProblem(data));
    else if (event === "done") this.done(data);
    return ["done", "error", "approval_required"].includes(event);
  }

  plan(plan) {
    this.planner.textContent = `Planned by ${plan.planner}${plan.rationale ? `: ${plan.rationale}` : ""}`;
    for (const step of plan.steps) this.stepItem(step);
  }

  stepItem(step) {
    let item = this.steps.querySelector(`[data-step-id="${CSS.escape(step.id)}"]`);
    if (!item) {
      const what = step.tool ? `${step.description} (${step.tool})` : step.description;
      item = el(
        "li",
        { "data-step-id": step.id },
        el("span", { class: "step-kind" }, step.kind),
        ` ${what} `,
        el("span", { class: "step-status" }, "planned"),
      );
      this.steps.append(item);
    }
    return item;
  }

  step({ step, outcome }) {
    const status = this.stepItem(step).querySelector(".step-status");
    status.textContent = outcome ? `${outcome.status}: ${outcome.summary}` : "running";
    status.dataset.status = outcome ? outcome.status : "running";
  }

  delta(text) {
    this.text += text;
    this.answerText.textContent = this.text;
  }

  cite(citations) {
    this.citations = citations;
    this.render(this.text, citations);
  }

  render(text, citations) {
    this.text = text;
    this.answerText.replaceChildren(answerWithCitations(text, citations));
    this.sources.replaceChildren(citations.length ? sourcesList(citations) : "");
  }

  approvalRequired(request) {
    this.conversationId = request.conversation_id;
    this.messageId = request.message_id;
    this.answer.setAttribute("aria-busy", "false");
    this.extra.replaceChildren(approvalCard(request, this));
    announce("An action needs your approval before I continue.");
  }

  decided(approval) {
    this.extra.replaceChildren(
      el("p", { class: "decision" }, `${approval.tool}: ${approval.status.replace("_", " ")}`),
    );
    this.answer.setAttribute("aria-busy", "true");
  }

  done(done) {
    this.conversationId = done.conversation_id;
    this.messageId = done.message_id;
    this.answer.setAttribute("aria-busy", "false");
    this.answer.classList.add("complete");
    if (!this.text) this.answerText.textContent = "(no answer)";
    announce("Answer complete.");
  }

  fail(problem) {
    this.answer.setAttribute("aria-busy", "false");
    this.extra.append(problemView(problem));
    announce(problem instanceof ApiProblem && problem.refusal ? "Refused." : "The answer failed.");
  }

  /** The recorded explanation, loaded the first time the panel opens on a finished turn. */
  async explain() {
    if (!this.how.open || this.explained || !this.messageId || !this.conversationId) return;
    this.explained = true;
    try {
      const explanation = await api(
        `/v1/conversations/${encodeURIComponent(this.conversationId)}` +
          `/turns/${encodeURIComponent(this.messageId)}/explain`,
      );
      const models = explanation.model_calls.map((call) => call.deployment).filter(Boolean);
      this.how.append(
        el(
          "p",
          { class: "explain" },
          `${explanation.sources.length} passage(s) considered` +
            (models.length ? `; models: ${[...new Set(models)].join(", ")}` : "") +
            `; ${Math.round(explanation.duration_ms)} ms.`,
        ),
      );
    } catch (problem) {
      // An answer still running, or one recorded before explanations: the steps suffice.
      if (problem.status !== 404) this.how.append(problemView(problem));
    }
  }
}

async function runTurn(view, events) {
  try {
    for await (const event of events) {
      if (view.apply(event)) break;
    }
  } catch (problem) {
    view.fail(problem);
  }
  if (view.conversationId) state.conversationId = view.conversationId;
}

async function ask(question) {
  state.busy = true;
  $("send").disabled = true;
  const view = new TurnView(question);
  const body = { message: question };
  if (state.conversationId) body.conversation_id = state.conversationId;
  await runTurn(view, streamEvents("/v1/chat/stream", body));
  state.busy = false;
  $("send").disabled = false;
  await Promise.all([loadConversations(), loadApprovals()]);
}

// --- approvals ----------------------------------------------------------------------------

function approvalCard(request, view) {
  const headingId = `approval-${request.approval_id ?? request.id}`;
  const card = el(
    "div",
    { class: "approval-card", role: "group", "aria-labelledby": headingId },
    el("h3", { id: headingId }, "Approval needed"),
    el("p", {}, request.summary),
    el(
      "dl",
      {},
      el("dt", {}, "Action"),
      el("dd", {}, el("code", {}, request.tool)),
      el("dt", {}, "With"),
      el("dd", {}, el("pre", {}, JSON.stringify(request.arguments, null, 2))),
      el("dt", {}, "Expires"),
      el("dd", {}, new Date(request.expires_at).toLocaleString()),
    ),
  );
  const id = request.approval_id ?? request.id;
  const decide = (decision) => async () => {
    for (const button of card.querySelectorAll("button")) button.disabled = true;
    if (view) {
      await runTurn(view, streamEvents(`/v1/approvals/${encodeURIComponent(id)}/stream`, { decision }));
      await Promise.all([loadConversations(), loadApprovals()]);
    } else {
      await decideElsewhere(id, decision, card);
    }
  };
  card.append(
    el(
      "div",
      { class: "actions" },
      el("button", { type: "button", class: "approve", onclick: decide("approve") }, "Approve"),
      el("button", { type: "button", class: "reject", onclick: decide("reject") }, "Reject"),
    ),
  );
  return card;
}

/** A decision from the list of pending approvals (not a turn on screen): the resumed
 * answer is stored in the requester's conversation. */
async function decideElsewhere(id, decision, card) {
  try {
    const outcome = await api(`/v1/approvals/${encodeURIComponent(id)}`, {
      method: "POST",
      body: { decision },
    });
    card.replaceWith(el("li", {}, `${outcome.approval.tool}: ${outcome.approval.status}`));
    announce(`Approval ${outcome.approval.status}.`);
    await loadConversations();
    if (outcome.answer && outcome.answer.conversation_id === state.conversationId) {
      await openConversation(state.conversationId);
    }
  } catch (problem) {
    card.append(problemView(problem));
  }
}

async function loadApprovals() {
  const shown = new Set(
    [...document.querySelectorAll(".messages .approval-card")].map((card) =>
      card.getAttribute("aria-labelledby"),
    ),
  );
  let pending = [];
  try {
    pending = (await api("/v1/approvals")).items;
  } catch {
    // No approval gate configured (404) or no permission: nothing to show.
  }
  const list = $("approval-list");
  list.replaceChildren(
    ...pending
      .filter((approval) => !shown.has(`approval-${approval.id}`))
      .map((approval) => el("li", {}, approvalCard(approval, null))),
  );
  $("approvals").hidden = list.children.length === 0;
}

// --- conversations --------------------------------------------------------------------------

async function loadConversations() {
  const list = $("conversation-list");
  let page;
  try {
    page = await api("/v1/conversations?limit=50");
  } catch (problem) {
    list.replaceChildren(el("li", {}, problemView(problem)));
    return;
  }
  list.replaceChildren(...page.items.map(conversationItem));
}

function conversationItem(conversation) {
  const current = conversation.id === state.conversationId;
  const item = el("li", { "data-conversation-id": conversation.id });
  const open = el(
    "button",
    {
      type: "button",
      class: "conversation-open",
      "aria-current": current ? "true" : false,
      onclick: () => openConversation(conversation.id),
    },
    conversation.title,
  );
  const rename = el(
    "button",
    {
      type: "button",
      class: "small",
      "aria-label": `Rename ${conversation.title}`,
      onclick: () => startRename(item, conversation, rename),
    },
    "Rename",
  );
  const remove = el(
    "button",
    {
      type: "button",
      class: "small danger",
      "aria-label": `Delete ${conversation.title}`,
      onclick: () => deleteConversation(conversation),
    },
    "Delete",
  );
  item.append(open, el("span", { class: "conversation-actions" }, rename, remove));
  return item;
}

function startRename(item, conversation, opener) {
  const inputId = `rename-${conversation.id}`;
  const input = el("input", { id: inputId, type: "text", value: conversation.title, maxlength: 200 });
  const form = el(
    "form",
    { class: "rename" },
    el("label", { for: inputId, class: "visually-hidden" }, `New title for ${conversation.title}`),
    input,
    el("button", { type: "submit", class: "small" }, "Save"),
  );
  const cancel = () => {
    form.replaceWith(...restored);
    opener.focus();
  };
  const restored = [...item.childNodes];
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const title = input.value.trim();
    if (!title) return cancel();
    try {
      await api(`/v1/conversations/${encodeURIComponent(conversation.id)}`, {
        method: "PATCH",
        body: { title },
      });
      announce(`Renamed to ${title}.`);
      await loadConversations();
      $("conversation-list")
        .querySelector(`[data-conversation-id="${CSS.escape(conversation.id)}"] .conversation-open`)
        ?.focus();
    } catch (problem) {
      form.append(problemView(problem));
    }
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      cancel();
    }
  });
  item.replaceChildren(form);
  input.focus();
  input.select();
}

async function deleteConversation(conversation) {
  if (!window.confirm(`Delete "${conversation.title}" and all its messages?`)) return;
  try {
    await api(`/v1/conversations/${encodeURIComponent(conversation.id)}`, { method: "DELETE" });
  } catch (problem) {
    showNotice(`${problem.title}: ${problem.detail}`);
    return;
  }
  if (conversation.id === state.conversationId) newConversation();
  announce(`Deleted ${conversation.title}.`);
  await loadConversations();
  $("new-conversation").focus();
}

async function openConversation(id) {
  let conversation;
  try {
    conversation = await api(`/v1/conversations/${encodeURIComponent(id)}`);
  } catch (problem) {
    showNotice(`${problem.title}: ${problem.detail}`);
    return;
  }
  state.conversationId = id;
  $("messages").replaceChildren();
  let view = null;
  for (const message of conversation.messages) {
    if (message.role === "user") {
      view = new TurnView(message.content);
      continue;
    }
    if (!view) continue;
    view.conversationId = id;
    view.messageId = message.id;
    view.render(message.content, message.citations);
    if (message.plan) view.plan(message.plan);
    if (message.status === "awaiting_approval") {
      view.extra.append(el("p", {}, "Waiting for an approval (see above)."));
    } else if (message.status !== "complete") {
      view.extra.append(el("p", { class: "problem" }, `This answer is ${message.status}.`));
    }
    view.answer.setAttribute("aria-busy", "false");
  }
  await Promise.all([loadConversations(), loadApprovals()]);
  announce(`Opened ${conversation.title}.`);
  $("message").focus();
}

function newConversation() {
  state.conversationId = null;
  $("messages").replaceChildren();
  closePassage();
  void loadConversations();
  $("message").focus();
}

// --- wiring -------------------------------------------------------------------------------

function identityChanged() {
  showNotice("");
  newConversation();
  void loadApprovals();
}

const identity = config.auth === "dev" ? devIdentity(config) : await entraIdentity(config);

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("message").value.trim();
  if (!question || state.busy) return;
  $("message").value = "";
  void ask(question);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("new-conversation").addEventListener("click", newConversation);
$("passage-close").addEventListener("click", closePassage);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closePassage();
});

if (identity.signedIn()) {
  await Promise.all([loadConversations(), loadApprovals()]);
} else {
  $("send").disabled = true;
  if (config.auth === "jwt" && config.configured) showNotice("Sign in to start.");
}
document.body.dataset.ready = "true";
