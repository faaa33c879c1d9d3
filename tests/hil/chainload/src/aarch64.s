// dmakern-chainload aarch64 entry.
//
// The first 64 bytes are an arm64 Image header (Documentation/arch/arm64/booting.rst), so the Pi
// firmware (kernel8.img), QEMU -kernel and U-Boot booti load the raw image at a 2 MiB-aligned base
// (or the firmware's 0x80000) with x0 = DTB. Linked at 0 and position-independent: the
// R_AARCH64_RELATIVE relocations are applied here for wherever we were put; until then only
// PC-relative addressing is used. The MMU stays off throughout (as the firmware left it).

.equ R_AARCH64_RELATIVE, 1027
.equ STACK_SIZE, 0x4000

.section .text.head, "ax"
.global _start
_start:
    b       entry                       // code0
    .long   0                           // code1
    .quad   0                           // text_offset
    .quad   __loader_size               // image_size, bss and stack included
    .quad   0xa                         // flags: little-endian, 4 KiB pages, anywhere in RAM
    .quad   0                           // res2
    .quad   0                           // res3
    .quad   0                           // res4
    .ascii  "ARM\x64"                   // magic
    .long   0                           // res5

entry:
    mov     x19, x0                     // DTB
    msr     daifset, #0xf
    // Only the boot CPU (affinity 0) runs the loader; loaders that start every core at the entry
    // would otherwise run it four times.
    mrs     x1, mpidr_el1
    mov     x2, #0xffffff
    movk    x2, #0xff, lsl #32
    tst     x1, x2
    b.ne    park
    adrp    x20, _start
    add     x20, x20, :lo12:_start      // load base = runtime address of _start (linked at 0)
    adrp    x1, __rela_start
    add     x1, x1, :lo12:__rela_start
    adrp    x2, __rela_end
    add     x2, x2, :lo12:__rela_end
1:  cmp     x1, x2
    b.hs    2f
    ldp     x3, x4, [x1], #16           // r_offset, r_info
    ldr     x5, [x1], #8                // r_addend
    cmp     x4, #R_AARCH64_RELATIVE
    b.ne    park                        // the link step allows no other kind (see build.sh)
    add     x5, x5, x20
    str     x5, [x20, x3]
    b       1b
2:  adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
3:  cmp     x1, x2
    b.hs    4f
    stp     xzr, xzr, [x1], #16
    b       3b
4:  adrp    x1, __stack_top
    add     x1, x1, :lo12:__stack_top
    mov     sp, x1
    mov     x0, x19
    mov     x1, x20
    adrp    x2, __loader_end
    add     x2, x2, :lo12:__loader_end
    mov     x3, xzr                     // no machine type on arm64
    bl      loader_main
park:
    wfe
    b       park

// boot_kernel(dtb, entry, start, len, machine): clean and invalidate [start, start + len) to the
// point of coherency, invalidate the instruction cache, and enter the kernel at `entry` with x0 = DTB and
// x1..x3 = 0 (the arm64 boot protocol; `machine` is unused), MMU off as we are.
.section .text, "ax"
.global boot_kernel
boot_kernel:
    mrs     x4, ctr_el0
    ubfx    x4, x4, #16, #4             // DminLine: log2(words per smallest D-cache line)
    mov     x5, #4
    lsl     x5, x5, x4                  // line size in bytes
    sub     x6, x5, #1
    bic     x6, x2, x6
    add     x7, x2, x3
5:  cmp     x6, x7
    b.hs    6f
    dc      civac, x6
    add     x6, x6, x5
    b       5b
6:  dsb     sy
    ic      iallu
    dsb     sy
    isb
    mov     x4, x1
    mov     x1, xzr
    mov     x2, xzr
    mov     x3, xzr
    br      x4

.section .bss.stack, "aw", %nobits
.balign 16
__stack_bottom:
    .space  STACK_SIZE
.global __stack_top
__stack_top:
