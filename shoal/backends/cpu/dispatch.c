/* The kernels' entry points, forwarding to the tier library loaded at run time (isa.py picks the
 * tier; kernels.py builds one library per tier and hands its path to shoal_load_tier). Built without
 * any ISA flags, into the library that ops.cpp's torch operators and kernels.py's ctypes calls use,
 * so neither needs to know which tier runs. A tier can be switched in a running process (tests run
 * each tier the CPU has); a forwarder costs one indirect jump. */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "kernels.h"

#define SHOAL_SLOT(name, params, args) void *name;
static struct {
    SHOAL_KERNELS_INT(SHOAL_SLOT)
    SHOAL_KERNELS_VOID(SHOAL_SLOT)
} table;
#undef SHOAL_SLOT

static char error[512];

const char *shoal_tier_error(void) { return error; }

int shoal_load_tier(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(error, sizeof error, "%s", dlerror());
        return -1;
    }
    void *next[sizeof table / sizeof(void *)];
    int i = 0;
#define SHOAL_FIND(name, params, args)                                                   \
    if (!(next[i++] = dlsym(h, #name))) {                                                \
        snprintf(error, sizeof error, "%s: kernel %s missing", path, #name);             \
        return -2;                                                                       \
    }
    SHOAL_KERNELS_INT(SHOAL_FIND)
    SHOAL_KERNELS_VOID(SHOAL_FIND)
#undef SHOAL_FIND
    memcpy(&table, next, sizeof table); /* the old library stays loaded: a running call finishes in it */
    return 0;
}

#define SHOAL_FORWARD_INT(name, params, args) \
    int name params { return ((int(*) params)table.name) args; }
#define SHOAL_FORWARD_VOID(name, params, args) \
    void name params { ((void(*) params)table.name) args; }
SHOAL_KERNELS_INT(SHOAL_FORWARD_INT)
SHOAL_KERNELS_VOID(SHOAL_FORWARD_VOID)
