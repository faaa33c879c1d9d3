// dmakern-chainload armv7 entry, A32 state.
//
// The image starts with the zImage header words (magic at 0x24, start/end at 0x28/0x2c), so U-Boot
// bootz takes it as well as the Pi firmware (kernel7.img at 0x8000) and QEMU raspi2b (0x10000),
// which jump to offset 0 with r0 = 0, r1 = machine type, r2 = DTB, MMU and D-cache off, in HYP or
// SVC mode. Linked at 0 and position-independent: the R_ARM_RELATIVE relocations are applied here;
// until then only PC-relative addressing (the ADDR macro) is used. The MMU stays off throughout.

.syntax unified
.arm

.equ R_ARM_RELATIVE, 23
.equ STACK_SIZE, 0x4000

// \reg = run-time address of \sym (the add reads pc as its own address + 8).
.macro ADDR reg, sym
    movw    \reg, #:lower16:(\sym - (.Laddr_pc\@ + 8))
    movt    \reg, #:upper16:(\sym - (.Laddr_pc\@ + 8))
.Laddr_pc\@:
    add     \reg, pc, \reg
.endm

.section .text.head, "ax"
.global _start
_start:
    b       entry                       // 0x00
    .space  0x20                        // 0x04..0x23: unused zImage code words
    .word   0x016f2818                  // 0x24: zImage magic
    .word   0                           // 0x28: start (linked at 0)
    .word   __loader_size               // 0x2c: end = bytes to reserve, bss and stack included
    .word   0x04030201                  // 0x30: little-endian

entry:
    mov     r4, r2                      // DTB
    mov     r5, r1                      // machine type, passed on to the kernel
    cpsid   aif
    // Only the boot CPU (affinity 0) runs the loader.
    mrc     p15, 0, r0, c0, c0, 5       // MPIDR
    ands    r0, r0, #0xff
    bne     park
    ADDR    r6, _start                  // load base (linked at 0)
    ADDR    r0, __rel_start
    ADDR    r1, __rel_end
1:  cmp     r0, r1
    bhs     2f
    ldm     r0!, {r2, r3}               // r_offset, r_info
    cmp     r3, #R_ARM_RELATIVE
    bne     park                        // the link step allows no other kind (see build.sh)
    ldr     r3, [r6, r2]
    add     r3, r3, r6
    str     r3, [r6, r2]
    b       1b
2:  ADDR    r0, __bss_start
    ADDR    r1, __bss_end
    mov     r2, #0
3:  cmp     r0, r1
    strlo   r2, [r0], #4
    blo     3b
    ADDR    sp, __stack_top
    mov     r0, r4
    mov     r1, r6
    ADDR    r2, __loader_end
    mov     r3, r5
    bl      loader_main
park:
    wfe
    b       park

// boot_kernel(dtb, entry, start, len, machine): clean and invalidate [start, start + len) to the
// point of coherency, invalidate the instruction cache and branch predictor, and enter `entry`
// with r0 = 0, r1 = machine, r2 = DTB (the Linux ARM boot protocol), MMU off as we are.
.section .text, "ax"
.global boot_kernel
boot_kernel:
    ldr     r12, [sp]                   // machine (fifth argument)
    mrc     p15, 0, r4, c0, c0, 1       // CTR
    ubfx    r4, r4, #16, #4             // DminLine: log2(words per smallest D-cache line)
    mov     r5, #4
    lsl     r5, r5, r4                  // line size in bytes
    sub     r6, r5, #1
    bic     r6, r2, r6
    add     r7, r2, r3
4:  cmp     r6, r7
    bhs     5f
    mcr     p15, 0, r6, c7, c14, 1      // DCCIMVAC
    add     r6, r6, r5
    b       4b
5:  dsb     sy
    mov     r4, #0
    mcr     p15, 0, r4, c7, c5, 0       // ICIALLU
    mcr     p15, 0, r4, c7, c5, 6       // BPIALL
    dsb     sy
    isb
    mov     r4, r1
    mov     r2, r0
    mov     r1, r12
    mov     r0, #0
    bx      r4

.section .bss.stack, "aw", %nobits
.balign 16
    .space  STACK_SIZE
.global __stack_top
__stack_top:
