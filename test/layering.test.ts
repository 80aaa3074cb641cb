// The import direction: core/ is the shared domain and imports none of the programs built on it
// (gateway/, admin/, cli/, bin/); config/ is read by all of them and imports none of them either.
// Every static import, export-from, side-effect import, import() and require() is checked; the
// scanner itself is checked against planted violations, so a broken scanner cannot pass quietly.
import t from 'tap'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, relative, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = fileURLToPath(new URL('..', import.meta.url))

const RULES: ReadonlyArray<{ from: string; forbidden: readonly string[] }> = [
  { from: 'core', forbidden: ['gateway', 'admin', 'cli', 'bin'] },
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
      for (let j = k + 1; j < tokens.length; j++) {
        const x = tokens[j] as Token
        if (x.kind === 'word' && x.value === 'from' && tokens[j + 1]?.kind === 'string') {
          refs.push({ specifier: (tokens[j + 1] as Token).value, line: tok.line, how: tok.value })
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

function violations(root: string): string[] {
  const out: string[] = []
  for (const file of sourceFiles(root)) {
    const rel = relative(root, file)
    const rule = RULES.find((r) => rel.split(sep)[0] === r.from)
    if (!rule) continue
    for (const ref of moduleRefs(readFileSync(file, 'utf8'))) {
      if (ref.specifier === null) {
        out.push(`${rel}:${ref.line}: a computed ${ref.how} cannot be checked; name the module literally`)
        continue
      }
      const top = targetTop(root, file, ref.specifier)
      if (top && rule.forbidden.includes(top)) out.push(`${rel}:${ref.line}: ${rule.from}/ must not ${ref.how} ${top}/ (${ref.specifier})`)
    }
  }
  return out
}

t.test('core/ and config/ import nothing from the programs built on them', async (t) => {
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
      "import { shared } from '../config/schema.ts'",
      "export const from = 'x'",
      'export { here }',
      '',
    ].join('\n'),
  )
  put('gateway/index.ts', "import { core } from '../core/fine.ts'\nimport '../admin/x.ts'\n")
  put('test/x.test.ts', "import '../gateway/index.ts'\n")

  const found = violations(root)
  t.same(found.sort(), [
    `config${sep}bad.ts:1: config/ must not import admin/ (../admin/x.ts)`,
    `core${sep}bad.ts:10: core/ must not import() gateway/ (../gateway/lazy.ts)`,
    `core${sep}bad.ts:11: core/ must not import() admin/ (../admin/lazy.ts)`,
    `core${sep}bad.ts:12: a computed import() cannot be checked; name the module literally`,
    `core${sep}bad.ts:13: core/ must not require() cli/ (../cli/old.js)`,
    `core${sep}bad.ts:14: core/ must not import gateway/ (keygate/gateway/index.ts)`,
    `core${sep}bad.ts:1: core/ must not import gateway/ (../gateway/server.ts)`,
    `core${sep}bad.ts:2: core/ must not import admin/ (../admin/routes.ts)`,
    `core${sep}bad.ts:3: core/ must not import cli/ (../cli/main.ts)`,
    `core${sep}bad.ts:7: core/ must not export gateway/ (../gateway/x.ts)`,
    `core${sep}bad.ts:8: core/ must not export admin/ (../admin/all.ts)`,
    `core${sep}bad.ts:9: core/ must not import bin/ (../bin/keygate.ts)`,
    `core${sep}deep${sep}er.ts:1: core/ must not export gateway/ (../../gateway/index.ts)`,
  ].sort())
})
