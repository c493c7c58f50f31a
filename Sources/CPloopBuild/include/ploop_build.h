#ifndef PLOOP_BUILD_H
#define PLOOP_BUILD_H

/* What the binary was built from, as Package.swift saw it (Context.gitInformation). */

/* The commit's full hash, or "" when the package was not built from a git checkout. */
const char *ploop_build_commit(void);

/* 1 when the checkout had changes not committed, else 0. */
int ploop_build_uncommitted_changes(void);

#endif
