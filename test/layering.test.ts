// The import direction: core/ is the shared domain and imports none of the programs built on it
// (gateway/, admin/, cli/, bin/), and from config/ only types (import type: the configuration's
// type, erased when types are stripped), as the README's Layout says; config/ is read by all of
// them and imports none of the programs either.
// Every static import, export-from, side-effect import, import() and require() is checked; the
// scanner itself is checked against planted violations, so a broken scanner cannot pass quietly.
// The same tokens show where a key hash or the admin token is compared other than in constant time.
import t from 'tap'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, relative, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = fileURLToPath(new URL('..', import.meta.url))

const RULES: ReadonlyArray<{ from: string; forbidden: readonly string[]; typesOnly?: readonly string[] }> = [
  { from: 'core', forbidden: ['gateway', 'admin', 'cli', 'bin'], typesOnly: ['config'] },
  { from: 'config', forbidden: ['gateway', 'admin', 'cli', 'bin'] },
]

const SKIP_DIRS = new Set(['node_modules', '.git', '.tap', 'coverage'])

function sourceFiles(root: string, dir = root): string[] {
  const out: string[] = []
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (entry.isDirectory()) {
      if (!SKIP_DIRS.has(entry.name)) out.push(...sourceFiles(root, join(dir, entry.name)))
    } else if (/\.[mc]?ts$/.test(entry.name)) {
      out.push(join(dir, entry.name))
    }
  }
  return out
}

type Token = { kind: 'word' | 'punct' | 'string'; value: string; line: number }

/**
 * A small TypeScript tokenizer: enough to tell code from comments, strings, template literals
 * and regular expressions, so import-like text inside those is not mistaken for an import.
 * A template literal with no substitutions is a string token (it can name a module in import()).
 */
function tokenize(src: string): Token[] {
  const tokens: Token[] = []
  const templates: number[] = [] // brace depth at which each open `${` resumes its template
  let depth = 0
  let line = 1
  let i = 0
  const REGEX_AFTER = new Set(['return', 'typeof', 'instanceof', 'in', 'of', 'new', 'delete', 'void', 'throw', 'case', 'do', 'else', 'yield', 'await'])
  const regexAllowed = () => {
    const prev = tokens[tokens.length - 1]
    if (!prev) return true
    if (prev.kind === 'string') return false
    if (prev.kind === 'word') return REGEX_AFTER.has(prev.value)
    return ![')', ']', '}'].includes(prev.value)
  }
  const readTemplate = (resumed: boolean): void => {
    // i is just after the opening ` (resumed: false) or after the } closing a substitution
    let text = ''
    while (i < src.length) {
      const c = src[i] as string
      if (c === '\\') {
        text += src.slice(i, i + 2)
        i += 2
        continue
      }
      if (c === '\n') line++
      if (c === '`') {
        i++
        tokens.push(resumed ? { kind: 'punct', value: '`', line } : { kind: 'string', value: text, line })
        return
      }
      if (c === '$' && src[i + 1] === '{') {
        i += 2
        templates.push(depth)
        depth++
        tokens.push({ kind: 'punct', value: '${', line })
        return
      }
      text += c
      i++
    }
  }
  while (i < src.length) {
    const c = src[i] as string
    const next = src[i + 1]
    if (c === '\n') {
      line++
      i++
    } else if (/\s/.test(c)) {
      i++
    } else if (c === '/' && next === '/') {
      while (i < src.length && src[i] !== '\n') i++
    } else if (c === '/' && next === '*') {
      const end = src.indexOf('*/', i + 2)
      const stop = end === -1 ? src.length : end + 2
      for (let k = i; k < stop; k++) if (src[k] === '\n') line++
      i = stop
    } else if (c === '"' || c === "'") {
      let value = ''
      i++
      while (i < src.length && src[i] !== c && src[i] !== '\n') {
        if (src[i] === '\\') {
          value += src[i + 1] ?? ''
          i += 2
        } else {
          value += src[i]
          i++
        }
      }
      i++
      tokens.push({ kind: 'string', value, line })
    } else if (c === '`') {
      i++
      readTemplate(false)
    } else if (c === '/' && regexAllowed()) {
      let inClass = false
      i++
      while (i < src.length && src[i] !== '\n') {
        const r = src[i]
        if (r === '\\') i++
        else if (r === '[') inClass = true
        else if (r === ']') inClass = false
        else if (r === '/' && !inClass) break
        i++
      }
      i++
      while (i < src.length && /[a-z]/i.test(src[i] as string)) i++
      tokens.push({ kind: 'punct', value: '/re/', line })
    } else if (/[A-Za-z_$]/.test(c)) {
      let j = i + 1
      while (j < src.length && /[\w$]/.test(src[j] as string)) j++
      tokens.push({ kind: 'word', value: src.slice(i, j), line })
      i = j
    } else if (/\d/.test(c)) {
      let j = i + 1
      while (j < src.length && /[\w.]/.test(src[j] as string)) j++
      tokens.push({ kind: 'punct', value: '0', line })
      i = j
    } else if (c === '{') {
      depth++
      tokens.push({ kind: 'punct', value: c, line })
      i++
    } else if (c === '}') {
      depth--
      i++
      if (templates.length > 0 && templates[templates.length - 1] === depth) {
        templates.pop()
        tokens.push({ kind: 'punct', value: '}', line })
        readTemplate(true)
      } else {
        tokens.push({ kind: 'punct', value: c, line })
      }
    } else {
      tokens.push({ kind: 'punct', value: c, line })
      i++
    }
  }
  return tokens
}

interface ModuleRef {
  specifier: string | null // null: a computed import() that cannot be checked
  line: number
  how: 'import' | 'export' | 'import()' | 'require()'
  /** `import type …` or `export type …`: erased when the types are stripped, nothing loaded. */
  typeOnly?: true
}

const CLAUSE = /^(?:[A-Za-z_$][\w$]*|[{},*])$/

/** Every module a file refers to. */
function moduleRefs(src: string): ModuleRef[] {
  const tokens = tokenize(src)
  const refs: ModuleRef[] = []
  for (let k = 0; k < tokens.length; k++) {
    const tok = tokens[k] as Token
    const prev = tokens[k - 1]
    const next = tokens[k + 1]
    if (tok.kind !== 'word' || prev?.value === '.' || !next) continue
    if ((tok.value === 'import' || tok.value === 'require') && next.value === '(') {
      const arg = tokens[k + 2]
      const close = tokens[k + 3]
      const literal = arg?.kind === 'string' && (close?.value === ')' || close?.value === ',')
      refs.push({ specifier: literal ? (arg as Token).value : null, line: tok.line, how: tok.value === 'import' ? 'import()' : 'require()' })
    } else if (tok.value === 'import' && next.kind === 'string') {
      refs.push({ specifier: next.value, line: tok.line, how: 'import' })
    } else if (tok.value === 'import' || tok.value === 'export') {
      // import a, { b as c, type D } from '...' / export * as ns from '...' / export { x } from '...'
      // (`import { type D } from` is no type-only import: it is stripped to `import {} from`.)
      const typeOnly = next.value === 'type' && tokens[k + 2]?.value !== 'from' && tokens[k + 2]?.value !== ','
      for (let j = k + 1; j < tokens.length; j++) {
        const x = tokens[j] as Token
        if (x.kind === 'word' && x.value === 'from' && tokens[j + 1]?.kind === 'string') {
          refs.push({ specifier: (tokens[j + 1] as Token).value, line: tok.line, how: tok.value, ...(typeOnly ? { typeOnly } : {}) })
          break
        }
        if (x.kind === 'string' || !CLAUSE.test(x.value)) break
      }
    }
  }
  return refs
}

/** The top-level folder of the repository a specifier points into, if it points into it. */
function targetTop(root: string, file: string, specifier: string): string | undefined {
  let abs: string
  if (specifier.startsWith('file:')) abs = fileURLToPath(specifier)
  else if (specifier.startsWith('.') || specifier.startsWith('/')) abs = resolve(dirname(file), specifier)
  else if (specifier === 'keygate' || specifier.startsWith('keygate/')) abs = resolve(root, specifier.slice('keygate'.length).replace(/^\//, ''))
  else return undefined
  const rel = relative(root, abs)
  if (rel === '' || rel.startsWith('..')) return undefined
  return rel.split(sep)[0]
}

/** The folders of the code keygate runs (not its tests, benchmarks or scripts). */
const PRODUCT = new Set(['core', 'config', 'gateway', 'admin', 'cli', 'bin'])

/**
 * Built-in modules keygate's code takes only types from, as an import of one reads every export:
 * node:http's `WebSocket` loads Node's own undici, about 80 ms of CPU at every start of a command
 * or a server (core/http.ts nodeHttp takes the module where it is used).
 */
const TYPES_ONLY = new Set(['node:http', 'http'])

function violations(root: string): string[] {
  const out: string[] = []
  for (const file of sourceFiles(root)) {
    const rel = relative(root, file)
    if (PRODUCT.has(rel.split(sep)[0] as string)) {
      for (const ref of moduleRefs(readFileSync(file, 'utf8'))) {
        if (ref.specifier !== null && TYPES_ONLY.has(ref.specifier) && !ref.typeOnly) out.push(`${rel}:${ref.line}: ${ref.how} ${ref.specifier} for its values; take types only (import type), and the module through nodeHttp()`)
      }
    }
    const rule = RULES.find((r) => rel.split(sep)[0] === r.from)
    if (!rule) continue
    for (const ref of moduleRefs(readFileSync(file, 'utf8'))) {
      if (ref.specifier === null) {
        out.push(`${rel}:${ref.line}: a computed ${ref.how} cannot be checked; name the module literally`)
        continue
      }
      const top = targetTop(root, file, ref.specifier)
      if (top && rule.forbidden.includes(top)) out.push(`${rel}:${ref.line}: ${rule.from}/ must not ${ref.how} ${top}/ (${ref.specifier})`)
      else if (top && rule.typesOnly?.includes(top) && !ref.typeOnly) out.push(`${rel}:${ref.line}: ${rule.from}/ takes only types from ${top}/ (import type), not ${ref.how} ${ref.specifier}`)
    }
  }
  return out
}

t.test('core/ and config/ import nothing from the programs built on them, and core/ only types from config/', async (t) => {
  const files = sourceFiles(ROOT).map((f) => relative(ROOT, f))
  t.ok(files.some((f) => f.startsWith(`core${sep}keys${sep}`)), 'nested folders are scanned')
  t.ok(files.some((f) => f.startsWith(`config${sep}`)))
  t.notOk(files.some((f) => f.includes('node_modules')))
  t.same(violations(ROOT), [])
})

t.test('the scanner reads what the repository actually imports', async (t) => {
  const refs = moduleRefs(readFileSync(join(ROOT, 'core/runtime.ts'), 'utf8')).map((r) => r.specifier)
  t.ok(refs.includes('../config/schema.ts'), 'import type')
  t.ok(refs.includes('./keys/service.ts'))
  t.ok(refs.includes('./migrate.ts'))
  const schemaRefs = moduleRefs(readFileSync(join(ROOT, 'config/schema.ts'), 'utf8')).map((r) => r.specifier)
  t.ok(schemaRefs.includes('../core/formats.ts'), 'side-effect import')
  t.ok(schemaRefs.includes('@sinclair/typebox'))
})

t.test('planted violations are all found, and look-alikes are not', async (t) => {
  const root = mkdtempSync(join(tmpdir(), 'keygate-layering-'))
  t.teardown(() => rmSync(root, { recursive: true, force: true }))
  const put = (rel: string, text: string) => {
    mkdirSync(dirname(join(root, rel)), { recursive: true })
    writeFileSync(join(root, rel), text)
  }
  put(
    'core/bad.ts',
    [
      "import { serve } from '../gateway/server.ts'", // 1
      "import type { Route } from '../admin/routes.ts'", // 2
      'import {', // 3
      '  a,',
      '  b as c,',
      "} from '../cli/main.ts'",
      "export { x } from '../gateway/x.ts'", // 7
      "export * from '../admin/all.ts'", // 8
      "import '../bin/keygate.ts'", // 9
      'const m = await import("../gateway/lazy.ts")', // 10
      'const n = await import(`../admin/lazy.ts`)', // 11
      'const name = "x"; const o = await import(`../gateway/${name}.ts`)', // 12
      "const p = require('../cli/old.js')", // 13
      "import * as all from 'keygate/gateway/index.ts'", // 14
      "import { NO_ROUTE } from '../config/routes.ts'", // 15
      "const q = await import('../config/load.ts')", // 16
      "export { ConfigSchema } from '../config/schema.ts'", // 17
      '',
    ].join('\n'),
  )
  put('core/deep/er.ts', "export * as g from '../../gateway/index.ts'\n")
  put('config/bad.ts', "import { x } from '../admin/x.ts'\nimport { y } from '../core/y.ts'\n")
  put(
    'core/fine.ts',
    [
      "// import { serve } from '../gateway/server.ts'",
      "/* export * from '../admin/all.ts' */",
      'const text = "import x from \'../gateway/x.ts\'"',
      "const re = /['\"]import\\('..\\/gateway'\\)/",
      'const tpl = `import("../gateway/t.ts") ${text}`',
      'const u = import.meta.url',
      "import { here } from './here.ts'",
      "import type { Config } from '../config/schema.ts'",
      "export type { RouteConfig } from '../config/schema.ts'",
      "export const from = 'x'",
      'export { here }',
      '',
    ].join('\n'),
  )
  put('gateway/index.ts', "import { core } from '../core/fine.ts'\nimport '../admin/x.ts'\n")
  put(
    'admin/http.ts',
    [
      "import http from 'node:http'", // 1
      "import { type Server } from 'node:http'", // 2: stripped to `import {} from 'node:http'`
      "import type { IncomingMessage } from 'node:http'",
      "import type http2 from 'node:http'",
      "export { STATUS_CODES } from 'http'", // 5
      "const h = await import('node:http')", // 6
      "export type { OutgoingHttpHeaders } from 'node:http'",
      '',
    ].join('\n'),
  )
  put('test/http.test.ts', "import http from 'node:http'\n")
  put('test/x.test.ts', "import '../gateway/index.ts'\n")

  const found = violations(root)
  t.same(found.sort(), [
    `config${sep}bad.ts:1: config/ must not import admin/ (../admin/x.ts)`,
    `core${sep}bad.ts:10: core/ must not import() gateway/ (../gateway/lazy.ts)`,
    `core${sep}bad.ts:11: core/ must not import() admin/ (../admin/lazy.ts)`,
    `core${sep}bad.ts:12: a computed import() cannot be checked; name the module literally`,
    `core${sep}bad.ts:13: core/ must not require() cli/ (../cli/old.js)`,
    `core${sep}bad.ts:14: core/ must not import gateway/ (keygate/gateway/index.ts)`,
    `core${sep}bad.ts:15: core/ takes only types from config/ (import type), not import ../config/routes.ts`,
    `core${sep}bad.ts:16: core/ takes only types from config/ (import type), not import() ../config/load.ts`,
    `core${sep}bad.ts:17: core/ takes only types from config/ (import type), not export ../config/schema.ts`,
    `core${sep}bad.ts:1: core/ must not import gateway/ (../gateway/server.ts)`,
    `core${sep}bad.ts:2: core/ must not import admin/ (../admin/routes.ts)`,
    `core${sep}bad.ts:3: core/ must not import cli/ (../cli/main.ts)`,
    `core${sep}bad.ts:7: core/ must not export gateway/ (../gateway/x.ts)`,
    `core${sep}bad.ts:8: core/ must not export admin/ (../admin/all.ts)`,
    `core${sep}bad.ts:9: core/ must not import bin/ (../bin/keygate.ts)`,
    `core${sep}deep${sep}er.ts:1: core/ must not export gateway/ (../../gateway/index.ts)`,
    `admin${sep}http.ts:1: import node:http for its values; take types only (import type), and the module through nodeHttp()`,
    `admin${sep}http.ts:2: import node:http for its values; take types only (import type), and the module through nodeHttp()`,
    `admin${sep}http.ts:5: export http for its values; take types only (import type), and the module through nodeHttp()`,
    `admin${sep}http.ts:6: import() node:http for its values; take types only (import type), and the module through nodeHttp()`,
  ].sort())
})

// SPEC §2: a key's hash is compared in constant time. ===, !==, Buffer#equals and the like stop
// at the first byte that differs, and how long they take tells a caller how much of a guess was
// right. Checked where key hashes and the admin token are compared: core/keys/ and admin/auth.ts.
const CONSTANT_TIME_FILES = /^(?:core\/keys\/.*|admin\/auth)\.ts$/
const SECRET_WORD = /hash|digest|secret|token/i
const LITERAL_WORDS = new Set(['undefined', 'null', 'true', 'false'])

/** The index of the bracket matching the one at `k`, walking in `step` direction. */
function matching(tokens: Token[], k: number, step: 1 | -1): number {
  const open = (tokens[k] as Token).value
  const close = { '(': ')', '[': ']', ')': '(', ']': '[' }[open] as string
  let depth = 0
  for (let j = k; j >= 0 && j < tokens.length; j += step) {
    const v = (tokens[j] as Token).value
    if (v === open) depth++
    else if (v === close && --depth === 0) return j
  }
  return step === 1 ? tokens.length - 1 : 0
}

/** One operand of a comparison: a member chain with its calls and indexes (`rows[0].key_hash`, `digest(x)`), or a literal. */
function operand(tokens: Token[], from: number, step: 1 | -1): Token[] {
  const out: Token[] = []
  let j = from
  let last: Token | undefined
  while (j >= 0 && j < tokens.length) {
    const tok = tokens[j] as Token
    const v = tok.value
    const bracket = step === 1 ? v === '(' || v === '[' : v === ')' || v === ']'
    if (bracket) {
      if (step === -1 && last?.kind === 'word') break // `(a) b`: two terms side by side
      const end = matching(tokens, j, step)
      const group = tokens.slice(Math.min(j, end), Math.max(j, end) + 1)
      out.splice(step === 1 ? out.length : 0, 0, ...group)
      j = end + step
      last = group[step === 1 ? group.length - 1 : 0]
      continue
    }
    const chain = v === '.' || (v === '?' && tokens[j + 1]?.value === '.')
    const term = tok.kind === 'word' || tok.kind === 'string' || v === '0'
    if (chain) {
      if (last === undefined) break
    } else if (term) {
      // Two terms side by side (`return x`, `typeof x`, `f(x) y`) end the operand; `f(x)` and `a[0]` do not.
      const lastIsTerm = last !== undefined && (last.kind !== 'punct' || last.value === '0')
      if (lastIsTerm || (step === 1 && last !== undefined && (last.value === ')' || last.value === ']'))) break
    } else {
      break
    }
    if (step === 1) out.push(tok)
    else out.unshift(tok)
    last = tok
    j += step
  }
  return out
}

interface Comparison {
  line: number
  op: string
  left: Token[]
  right: Token[]
}

/** Every ==, ===, != and !== (the tokenizer gives each character its own token). */
function comparisons(tokens: Token[]): Comparison[] {
  const out: Comparison[] = []
  for (let k = 0; k < tokens.length - 1; k++) {
    const v = (tokens[k] as Token).value
    const prev = tokens[k - 1]?.value
    if ((v !== '=' && v !== '!') || tokens[k + 1]?.value !== '=' || ['=', '!', '<', '>'].includes(prev as string)) continue
    const len = tokens[k + 2]?.value === '=' ? 3 : 2
    out.push({ line: (tokens[k] as Token).line, op: tokens.slice(k, k + len).map((x) => x.value).join(''), left: operand(tokens, k - 1, -1), right: operand(tokens, k + len, 1) })
    k += len - 1
  }
  return out
}

const text = (ts: Token[]) => ts.map((x) => (x.kind === 'string' ? JSON.stringify(x.value) : x.value)).join('')

/** A comparison of a hash, digest, secret or token's value (not its length, nor with a literal). */
function comparesSecret(c: Comparison): boolean {
  const literal = (ts: Token[]) => ts.length === 1 && ((ts[0] as Token).kind === 'string' || (ts[0] as Token).value === '0' || LITERAL_WORDS.has((ts[0] as Token).value))
  const sizeOf = (ts: Token[]) => ['length', 'size', 'byteLength'].includes(ts[ts.length - 1]?.value as string)
  if (literal(c.left) || literal(c.right) || sizeOf(c.left) || sizeOf(c.right)) return false
  return [...c.left, ...c.right].some((x) => x.kind === 'word' && SECRET_WORD.test(x.value))
}

/** The argument tokens of every call of `name` in `tokens`. */
function callsOf(tokens: Token[], name: string): Token[][] {
  const out: Token[][] = []
  for (let k = 0; k < tokens.length - 1; k++) {
    if ((tokens[k] as Token).value === name && tokens[k + 1]?.value === '(' && tokens[k - 1]?.value !== '.') out.push(tokens.slice(k + 2, matching(tokens, k + 1, 1)))
  }
  return out
}

/** The tokens of `function name`'s body. */
function functionBody(tokens: Token[], name: string): Token[] {
  const at = tokens.findIndex((x, k) => x.value === name && tokens[k - 1]?.value === 'function')
  if (at === -1) return []
  const open = tokens.findIndex((x, k) => k > at && x.value === '{' && tokens[k - 1]?.value !== ':')
  let depth = 0
  for (let j = open; j < tokens.length; j++) {
    const v = (tokens[j] as Token).value
    if (v === '{' || v === '${') depth++
    else if (v === '}' && --depth === 0) return tokens.slice(open + 1, j)
  }
  return tokens.slice(open + 1)
}

/** What in one file compares a key hash, digest or token other than in constant time. */
function timingLeaks(rel: string, src: string): string[] {
  const tokens = tokenize(src)
  const out: Array<{ line: number; what: string }> = []
  for (const c of comparisons(tokens)) {
    if (comparesSecret(c)) out.push({ line: c.line, what: `${text(c.left)} ${c.op} ${text(c.right)}: compare a key hash or token with timingSafeEqual` })
  }
  for (let k = 1; k < tokens.length - 1; k++) {
    const v = (tokens[k] as Token).value
    if (['equals', 'compare', 'localeCompare'].includes(v) && tokens[k - 1]?.value === '.' && tokens[k + 1]?.value === '(') out.push({ line: (tokens[k] as Token).line, what: `.${v}() stops at the first difference: compare with timingSafeEqual` })
  }
  return out.sort((a, b) => a.line - b.line).map((x) => `${rel}:${x.line}: ${x.what}`)
}

function constantTimeLeaks(root: string): string[] {
  return sourceFiles(root)
    .map((f) => relative(root, f).split(sep).join('/'))
    .filter((rel) => CONSTANT_TIME_FILES.test(rel))
    .flatMap((rel) => timingLeaks(rel, readFileSync(join(root, rel), 'utf8')))
}

t.test('key hashes and the admin token are compared in constant time (SPEC §2)', async (t) => {
  const format = tokenize(readFileSync(join(ROOT, 'core/keys/format.ts'), 'utf8'))
  const body = functionBody(format, 'hashesEqual')
  t.ok(body.length > 0, 'hashesEqual is found')
  t.equal(callsOf(body, 'timingSafeEqual').length, 1, 'hashesEqual compares with timingSafeEqual')
  t.same(comparisons(body).filter((c) => c.left[c.left.length - 1]?.value !== 'length'), [], 'and compares nothing else but lengths')
  const auth = tokenize(readFileSync(join(ROOT, 'admin/auth.ts'), 'utf8'))
  t.ok(callsOf(auth, 'timingSafeEqual').some((args) => args.some((x) => x.value === 'token')), 'the bootstrap token is compared with timingSafeEqual')
  t.same(constantTimeLeaks(ROOT), [])
})

t.test('planted timing leaks are all found, and look-alikes are not', async (t) => {
  const src = [
    'if (rows[0].key_hash === parsed.hash) ok()', // 1
    'return digest(presented).equals(token)', // 2
    "const same = a.toString('hex') == storedHash", // 3
    'if (token !== expected?.token) throw e', // 4
    'return Buffer.compare(x, keyDigest) === 0', // 5
    'if (hash !== undefined && SHA256_HEX.test(hash)) a()', // 6: fine
    "if (typeof (raw as { key_hash?: unknown }).key_hash === 'string') b()", // 7: fine
    'return x.length === 32 && digest.length === y.length && timingSafeEqual(x, y)', // 8: fine
    "if (shape === 'legacy') return hash('sha256', x)", // 9: fine
    'const ok = first === undefined || tokens.length !== 2', // 10: fine
    "const text = 'hash === other'", // 11: fine
    '// if (hash === other) leak()', // 12: fine
    'const f = (h) => h; if (count !== seen) c()', // 13: fine
    '',
  ].join('\n')
  t.same(timingLeaks('x.ts', src), [
    'x.ts:1: rows[0].key_hash === parsed.hash: compare a key hash or token with timingSafeEqual',
    'x.ts:2: .equals() stops at the first difference: compare with timingSafeEqual',
    'x.ts:3: a.toString("hex") == storedHash: compare a key hash or token with timingSafeEqual',
    'x.ts:4: token !== expected?.token: compare a key hash or token with timingSafeEqual',
    'x.ts:5: .compare() stops at the first difference: compare with timingSafeEqual',
  ])
  const leaky = tokenize('export function hashesEqual(a: string, b: string): boolean {\n  return a === b\n}\n')
  t.equal(callsOf(functionBody(leaky, 'hashesEqual'), 'timingSafeEqual').length, 0, 'a hashesEqual without timingSafeEqual is told apart')
  t.same(comparisons(functionBody(leaky, 'hashesEqual')).map((c) => `${text(c.left)} ${c.op} ${text(c.right)}`), ['a === b'])
})
