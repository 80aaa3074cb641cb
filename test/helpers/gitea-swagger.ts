// Checks the fake Gitea's answers against Gitea's published API description (the swagger excerpt
// in test/fixtures): each status must be one the operation declares (or one GITEA.md lists as
// real but undeclared: 401, 422, 500), each body must match the declared schema, and the success
// bodies may not carry fields the schema does not name, so the fake cannot drift from Gitea.
import { readFileSync } from 'node:fs'
import { Ajv, type ValidateFunction } from 'ajv'
import addFormatsModule from 'ajv-formats'
import type { Test } from 'tap'
import type { RecordedResponse } from './fake-gitea.ts'

const addFormats = addFormatsModule as unknown as (ajv: Ajv) => Ajv

export const SWAGGER = JSON.parse(readFileSync(new URL('../fixtures/gitea-tokens.swagger.json', import.meta.url), 'utf8')) as {
  paths: Record<string, Record<string, { responses: Record<string, unknown> }>>
  definitions: Record<string, Record<string, unknown>>
  responses: Record<string, { schema?: Record<string, unknown> }>
}

/**
 * Real statuses the excerpt does not declare: GITEA.md's "Also real but not declared" (401, 422,
 * 500), the 403 of the token-scope check on GET /user (GITEA.md, "Verify"), the 404 Gitea's
 * `{username}` lookup (context.UserAssignmentAPI, not in GITEA.md) answers for an unknown user
 * before the token handlers run, and the 403 Gitea's API middleware (verifyAuthWithOptions)
 * answers to any call signed in as a user barred from signing in, GET /version included.
 */
const UNDECLARED_BUT_REAL = ['401', '422', '500']
const UNDECLARED_ON: Record<string, string[]> = { 'GET /user': ['403'], 'GET /version': ['403'], 'GET /users/{username}/tokens': ['404'], 'POST /users/{username}/tokens': ['404'] }

/**
 * The body as the excerpt can judge it. An older Gitea's create handler leaves `scopes` unset, and
 * Go writes a nil slice as `null` (GITEA.md: "An older stored variant left it null"); the generator
 * has no way to say an array may be null, so the 201 is checked without it.
 */
function goNilScopes(where: string, body: unknown): unknown {
  if (where !== 'POST /users/{username}/tokens 201' || (body as { scopes?: unknown } | null)?.scopes !== null) return body
  const { scopes: _nil, ...rest } = body as Record<string, unknown>
  return rest
}

function closed(definition: Record<string, unknown>): Record<string, unknown> {
  return { ...definition, additionalProperties: false }
}

function build(): (r: RecordedResponse) => string[] {
  const ajv = new Ajv({ strict: false, allErrors: true })
  addFormats(ajv)
  ajv.addFormat('int64', { type: 'number', validate: (n: number) => Number.isSafeInteger(n) })
  const definitions: Record<string, unknown> = {}
  for (const [name, d] of Object.entries(SWAGGER.definitions)) definitions[name] = name === 'APIError' ? d : closed(d)
  ajv.addSchema({ $id: 'gitea', definitions })
  const at = (ref: string): ValidateFunction => ajv.compile({ $ref: `gitea#/definitions/${ref}` })
  const list = ajv.compile({ type: 'array', items: { $ref: 'gitea#/definitions/AccessToken' } })
  const listRef = SWAGGER.responses.AccessTokenList?.schema
  if (JSON.stringify(listRef) !== JSON.stringify({ type: 'array', items: { $ref: '#/definitions/AccessToken' } })) throw new Error('the excerpt changed its AccessTokenList schema')
  const success: Record<string, ValidateFunction> = {
    'GET /version 200': at('ServerVersion'),
    'GET /user 200': at('User'),
    'GET /users/{username}/tokens 200': list,
    'POST /users/{username}/tokens 201': at('AccessToken'),
  }
  const apiError = at('APIError')
  return (r) => {
    const problems: string[] = []
    const op = SWAGGER.paths[r.operation]?.[r.method.toLowerCase()]
    const where = `${r.method} ${r.operation} ${r.status}`
    if (!op) return [`${where}: not an operation of the excerpt`]
    const status = String(r.status)
    if (!(status in op.responses) && !UNDECLARED_BUT_REAL.includes(status) && !UNDECLARED_ON[`${r.method} ${r.operation}`]?.includes(status)) problems.push(`${where}: status not declared`)
    if (r.status === 204) {
      if (r.body !== undefined) problems.push(`${where}: a 204 has no body`)
      return problems
    }
    const validate = r.status < 300 ? success[where] : apiError
    if (!validate) return [...problems, `${where}: no schema for this answer`]
    if (!validate(goNilScopes(where, r.body))) problems.push(`${where}: ${ajv.errorsText(validate.errors)}`)
    if (r.operation === '/users/{username}/tokens' && r.method === 'GET' && r.status === 200) {
      if (r.headers['x-total-count'] === undefined) problems.push(`${where}: no X-Total-Count`)
      for (const t of r.body as Array<{ sha1: string }>) if (t.sha1 !== '') problems.push(`${where}: a listed token shows its secret`)
    }
    return problems
  }
}

/** Validates every recorded answer of the fakes; call at the end of a file. */
export function checkAgainstSwagger(t: Test, responses: readonly RecordedResponse[]): void {
  const check = build()
  t.same(responses.flatMap(check), [], `${responses.length} answers of the fake Gitea match the swagger excerpt`)
}

/** The distinct `METHOD operation status` answers the fakes gave (to show what was covered). */
export function answerKinds(responses: readonly RecordedResponse[]): string[] {
  return [...new Set(responses.map((r) => `${r.method} ${r.operation} ${r.status}`))].sort()
}
