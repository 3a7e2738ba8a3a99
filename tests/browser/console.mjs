// Drives hookline's console in Debian's headless Chromium (playwright-core). Run by
// tests/console_browser.rs, which starts the broker, hookline and the receivers, and answers this
// script's requests on stdin: the script writes `CMD <name> [arg]` lines to stdout and waits for `ok`.
// Screenshots go to $SHOTS. Every step asserts what the page shows; a failure exits non-zero.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import assert from "node:assert/strict";

const { BASE, ADMIN_TOKEN, TENANT_A_TOKEN, RECEIVER_URL, SHOTS, B_SUBSCRIPTION, A_SUBSCRIPTION } = process.env;
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function ask(cmd) {
  process.stdout.write(`CMD ${cmd}\n`);
  const { value } = await lines.next();
  assert.equal(value, "ok", `the test answered ${value} to ${cmd}`);
}

const log = (m) => process.stdout.write(`LOG ${m}\n`);

async function until(what, fn, ms = 60000) {
  const t = Date.now();
  for (;;) {
    try { if (await fn()) return; } catch (_) { /* retried */ }
    if (Date.now() - t > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 300));
  }
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  const shot = (name) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });

  // 1. Sign in as the admin with the keyboard only: the label names the field, Enter submits.
  await page.goto(`${BASE}/console`);
  await page.getByLabel(/Token/).waitFor();
  await shot("01-sign-in");
  await page.getByLabel(/Token/).focus();
  await page.keyboard.type(ADMIN_TOKEN);
  await page.keyboard.press("Enter");
  await page.getByText("signed in as admin").waitFor();
  await page.getByRole("heading", { name: "Subscriptions" }).waitFor();
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "hookline_session");
  assert.ok(session && session.httpOnly && session.sameSite === "Strict", JSON.stringify(cookies));
  assert.equal(await page.evaluate(() => document.cookie), "", "page scripts cannot read the session");

  // 2. Create a subscription from the console; its secret is shown once; deliveries appear.
  await page.getByLabel("Endpoint URL").fill(RECEIVER_URL);
  await page.getByLabel(/Event types/).fill("order.*");
  await page.getByRole("button", { name: "Create subscription" }).click();
  await page.getByText("Signing secret (shown once)").waitFor();
  const id = page.url().split("/").pop();
  log(`created ${id}`);
  await shot("02-subscription-created");
  await ask(`PRODUCE ${id}`);
  await until("10 delivered attempts", async () => {
    await page.getByRole("button", { name: "Refresh" }).click();
    await page.waitForTimeout(200);
    return (await page.locator("table >> text=delivered").count()) >= 10;
  });
  await page.getByLabel("Result").selectOption("delivered");
  await page.getByLabel("Search by event id").fill("ord-3");
  await until("the search to narrow the log", async () =>
    (await page.getByText(/^1 of the \d+ newest attempts$/).count()) === 1);
  await shot("03-deliveries");
  // A test delivery shows the receiver's answer.
  await page.getByRole("button", { name: "Send test delivery" }).click();
  await page.getByText(/Test delivery: delivered \(HTTP 200\)/).waitFor();

  // 3. The endpoint fails: the breaker opens, dead letters appear.
  await ask(`FAIL ${id}`);
  await until("the breaker to open", async () => {
    await page.reload();
    await page.getByRole("heading", { name: /^Subscription / }).waitFor();
    return (await page.locator("td", { hasText: /^open$/ }).count()) === 1;
  });
  await shot("04-breaker-open");
  await page.getByRole("link", { name: "Dead letters" }).click();
  await until("dead letters of the failed deliveries", async () => {
    await page.getByRole("button", { name: "Show" }).click();
    await page.waitForTimeout(300);
    return (await page.getByText(/^[1-9]\d* matching of/).count()) === 1;
  });
  await shot("05-dead-letters");

  // 4. Heal, preview the replay (dry run), then replay; the progress bar reaches the end.
  await ask(`HEAL ${id}`);
  await page.getByLabel("Subscription id").fill(id);
  await page.getByRole("button", { name: "Show" }).click();
  await page.getByRole("button", { name: "Preview (dry run)" }).click();
  await page.getByText(/Dry run: would replay [1-9]\d* of [1-9]\d* matching .* finished/).waitFor();
  await page.getByText("Sample of what would be replayed").waitFor();
  await shot("06-replay-dry-run");
  await page.getByRole("button", { name: "Replay", exact: true }).click();
  await page.getByText(/^Replayed [1-9]\d* of [1-9]\d* matching .* finished/).waitFor();
  const bar = page.getByRole("progressbar", { name: "Replay progress" });
  assert.equal(await bar.getAttribute("value"), await bar.getAttribute("max"));
  await shot("07-replayed");
  await ask(`REPLAYED ${id}`);

  // 5. Lag and rate.
  await page.getByRole("link", { name: "Lag and rate" }).click();
  await page.getByText(/deliveries\/s$/).waitFor();
  await shot("08-lag");

  // 6. A tenant: its own subscription only; another tenant's page by URL is not found.
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByText("Signed out.").waitFor();
  await page.getByLabel(/Token/).fill(TENANT_A_TOKEN);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("signed in as tenant acme").waitFor();
  await page.getByRole("link", { name: "Subscriptions" }).click();
  await page.getByText("1 subscriptions").waitFor();
  assert.equal(await page.getByRole("link", { name: A_SUBSCRIPTION.slice(0, 8) }).count(), 1);
  assert.equal(await page.getByRole("link", { name: B_SUBSCRIPTION.slice(0, 8) }).count(), 0);
  await shot("09-tenant-subscriptions");
  await page.goto(`${BASE}/console#/subscriptions/${B_SUBSCRIPTION}`);
  await page.getByRole("heading", { name: "Not found" }).waitFor();
  await page.getByText(`no subscription ${B_SUBSCRIPTION}`).waitFor();
  await shot("10-tenant-other-tenant-not-found");
  await page.getByRole("link", { name: "Dead letters" }).click();
  await page.getByText(/^0 matching of/).waitFor();

  assert.deepEqual(errors.filter((e) => !e.includes("404") && !e.includes("401")), [], "console errors");
  log("all steps passed");
} catch (e) {
  failed = true;
  process.stdout.write(`FAIL ${e.stack || e}\n`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
