#include "ploop_build.h"

/* Package.swift defines both; a build without them (no git) says so with the defaults. */
#ifndef PLOOP_GIT_COMMIT
#define PLOOP_GIT_COMMIT ""
#endif
#ifndef PLOOP_GIT_DIRTY
#define PLOOP_GIT_DIRTY 0
#endif

const char *ploop_build_commit(void) { return PLOOP_GIT_COMMIT; }

int ploop_build_uncommitted_changes(void) { return PLOOP_GIT_DIRTY; }
