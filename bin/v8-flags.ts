// The V8 flags a short command that may open the embedded store runs with, in the second process
// bin/keygate.ts starts for it (it says why). The tests start such commands with them too, as that
// second process, so that each runs in one (test/helpers/cli.ts).
export const SHORT_COMMAND_V8_FLAGS = ['--liftoff-only', '--single-threaded'] as const
