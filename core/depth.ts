// How deep a value nests, without imports of its own: the embedded store's thread uses it too.

/**
 * Whether `value` holds objects or arrays more than `levels` deep (a scalar, a Date or a byte
 * array counts as no level), looking no further down than that.
 */
export function nestsDeeper(value: unknown, levels: number): boolean {
  if (typeof value !== 'object' || value === null || value instanceof Date || ArrayBuffer.isView(value)) return false
  if (levels === 0) return true
  for (const v of Array.isArray(value) ? value : Object.values(value)) if (nestsDeeper(v, levels - 1)) return true
  return false
}
