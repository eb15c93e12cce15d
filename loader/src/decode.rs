//! Image bytes to interleaved RGB8, deciding the format by content. JPEGs go through zune-jpeg (the
//! decoder the `image` crate itself uses: pure Rust, SIMD, no native library to install), grayscale is
//! expanded to three channels and CMYK/YCCK converted; anything else goes through the `image` crate.

use zune_jpeg::JpegDecoder;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

use crate::error::{Error, Result};

/// Decodes into `out` (reused between calls); returns (width, height). An error is an
/// [`Error::Image`]: the caller knows which sample the bytes are.
pub fn decode_rgb(bytes: &[u8], out: &mut Vec<u8>) -> Result<(u32, u32)> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let options = DecoderOptions::default()
            .set_max_width(65_535)
            .set_max_height(65_535)
            .jpeg_set_out_colorspace(ColorSpace::RGB);
        let mut d = JpegDecoder::new_with_options(std::io::Cursor::new(bytes), options);
        d.decode_headers().map_err(|e| Error::image(format!("JPEG header: {e}")))?;
        let (w, h) = d.dimensions().ok_or_else(|| Error::image("JPEG without dimensions"))?;
        // The header's size is input: refused before the output buffer is sized from it.
        common::files::check_pixels(w as u64, h as u64).map_err(Error::image)?;
        let n = d.output_buffer_size().ok_or_else(|| Error::image("JPEG output size unknown"))?;
        if d.output_colorspace() != Some(ColorSpace::RGB) || n != w * h * 3 {
            return Err(Error::image(format!("JPEG decodes to {:?}, not RGB", d.output_colorspace())));
        }
        out.resize(n, 0);
        d.decode_into(out).map_err(|e| Error::image(format!("JPEG decode: {e}")))?;
        Ok((w as u32, h as u32))
    } else {
        let decode_failed = |e: image::ImageError| Error::image(format!("image decode: {e}"));
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format();
        let (w, h) = reader
            .map_err(|e| Error::image(format!("image decode: {e}")))?
            .into_dimensions()
            .map_err(decode_failed)?;
        common::files::check_pixels(w.into(), h.into()).map_err(Error::image)?;
        let img = image::load_from_memory(bytes).map_err(decode_failed)?.into_rgb8();
        let (w, h) = img.dimensions();
        out.clear();
        out.extend_from_slice(img.as_raw());
        Ok((w, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: image::DynamicImage) -> Vec<u8> {
        let mut out = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn content_decides_the_decoder_and_gray_becomes_rgb() {
        let mut out = vec![];
        // A PNG (whatever its name would be) decodes through the image crate.
        let rgb = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        assert_eq!(decode_rgb(&png(rgb.clone().into()), &mut out).unwrap(), (5, 4));
        assert_eq!(out, rgb.as_raw().as_slice());
        // Grayscale PNG: three equal channels.
        let gray = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 60 + y * 9) as u8]));
        decode_rgb(&png(gray.clone().into()), &mut out).unwrap();
        let expanded: Vec<u8> = gray.as_raw().iter().flat_map(|&v| [v, v, v]).collect();
        assert_eq!(out, expanded);
        // Grayscale JPEG through zune: three equal channels close to the source.
        let luma: Vec<u8> = (0..16 * 16).map(|i| (i % 16 * 16) as u8).collect();
        let mut jpeg = vec![];
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode(&luma, 16, 16, image::ExtendedColorType::L8)
            .unwrap();
        assert_eq!(decode_rgb(&jpeg, &mut out).unwrap(), (16, 16));
        for (p, &l) in out.chunks_exact(3).zip(&luma) {
            assert!(p[0] == p[1] && p[1] == p[2] && (p[0] as i32 - l as i32).abs() <= 8, "{p:?} vs {l}");
        }
        assert!(decode_rgb(b"not an image", &mut out).is_err());
    }

    /// A 16x16 JPEG whose frame header says 30000x30000 (2.7 GB of RGB) is refused from the header:
    /// the output buffer is never sized from it (it was, then the decode failed on the missing data).
    #[test]
    fn a_header_declaring_a_huge_image_allocates_nothing() {
        let mut jpeg = vec![];
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode(&[128u8; 16 * 16 * 3], 16, 16, image::ExtendedColorType::Rgb8)
            .unwrap();
        let sof = jpeg.windows(2).position(|m| m == [0xFF, 0xC0]).expect("a baseline SOF0");
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0x75, 0x30, 0x75, 0x30]); // 30000, 30000
        let mut out = vec![];
        let err = decode_rgb(&jpeg, &mut out).unwrap_err().to_string();
        assert!(err.contains("30000x30000 is 900000000 pixels, over the limit"), "{err}");
        assert!(out.capacity() < 1 << 20, "{} bytes reserved", out.capacity());
    }
}
